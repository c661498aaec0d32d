"""Shared inputs and checks for the kd_loss kernel tests (Triton and CUDA backends).

Every check runs the public op under a forced backend and compares per-row
losses and the student gradient (with a random grad_output) with the float64
oracle kdfast.ops.kd_loss.kd_loss_reference, by the numerics rule of
tests/numerics.py (the same-dtype PyTorch reference sets the error budget).
"""
import torch

import kdfast
from kdfast.ops.kd_loss import kd_loss, kd_loss_reference
from tests.numerics import assert_close_to_oracle

NINF = float("-inf")


def make_inputs(N, V, dtype=torch.float32, device="cpu", *, scale=10.0, masks=True, ignored=True, seed=0,
                row_pad=0, teacher_holes=True):
    """Student/teacher logits of scale ``scale``, labels with ignored rows and -inf masks.

    Masks (when N is large enough): row 1 ignored, row 2 masked on a shared tail (QA padding),
    row 3 fully masked in both models, row 4 masked in the teacher only on a few columns
    (``teacher_holes``; leave it off for reverse_kl, which is infinite there).
    ``row_pad`` > 0 makes row-strided (non-contiguous) views of wider buffers.
    """
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(N, V + row_pad, generator=g, dtype=torch.float64) * scale
    t = s * 0.5 + torch.randn(N, V + row_pad, generator=g, dtype=torch.float64) * scale
    labels = torch.randint(0, V, (N,), generator=g)
    if masks and N > 4:
        s[2, V // 2:] = NINF
        t[2, V // 2:] = NINF
        s[3] = NINF
        t[3] = NINF
        if teacher_holes:
            t[4, ::7] = NINF
        labels[2] = min(labels[2].item(), V // 2 - 1)
    if ignored and N > 1:
        labels[1] = -100
    s = s.to(dtype)[:, :V].to(device)
    t = t.to(dtype)[:, :V].to(device)
    return s, t, labels.to(device)


def per_row_and_grad(fn, s, t, labels, weights, **kw):
    """Per-row loss (reduction="none") and d(sum(w * rows))/d(student) through ``fn``."""
    leaf = row_stride_kept(s)
    x = s.detach().clone().requires_grad_() if leaf is None else leaf
    rows = fn(x, t, labels, reduction="none", **kw)
    (rows.double() * weights.double()).sum().backward()
    return rows.detach(), x.grad


def row_stride_kept(s):
    """A leaf copy of ``s`` keeping its row stride (non-contiguous inputs must reach the kernel as such)."""
    if s.is_contiguous() or s.dim() != 2:
        return None
    wide = torch.zeros(s.shape[0], s.stride(0), dtype=s.dtype, device=s.device)
    wide[:, :s.shape[1]] = s
    leaf = wide.requires_grad_()
    view = leaf[:, :s.shape[1]]
    view.retain_grad()
    return view


def check_against_oracle(backend, s, t, labels, *, divergence="kl", temperature=1.0, beta=0.5, hard_weight=0.5,
                         seed=1):
    """Backend's per-row losses and student gradient vs the float64 oracle."""
    kw = dict(temperature=temperature, divergence=divergence, beta=beta, hard_weight=hard_weight)
    g = torch.Generator().manual_seed(seed)
    weights = (torch.rand(s.shape[0], generator=g, dtype=torch.float64) + 0.5).to(s.device)
    with kdfast.use_backend(backend):
        rows, grad = per_row_and_grad(kd_loss, s, t, labels, weights, **kw)
    rows_o, grad_o = per_row_and_grad(kd_loss_reference, s.double(), t.double(), labels, weights, **kw)
    rows_r, grad_r = per_row_and_grad(kd_loss_reference, s, t, labels, weights, **kw)
    assert grad.dtype == s.dtype and grad.shape == s.shape
    dt = s.dtype
    assert_close_to_oracle(rows.cpu().double(), rows_o.cpu(), rows_r.cpu().double(), dt, what=f"{backend} rows")
    assert_close_to_oracle(grad.cpu().double(), grad_o.cpu(), grad_r.cpu().double(), dt, what=f"{backend} grad")
    if labels is not None:
        ign = (labels == -100).cpu()
        assert torch.all(rows.cpu()[ign] == 0) and torch.all(grad.cpu()[ign] == 0)
    return rows, grad
