"""TinyBERT hidden/embedding loss with the student->teacher projection fused,
and its cosine variant (DistilBERT).

Backends (dispatch name "hidden_mse", for hidden_mse and hidden_cosine):

    cpu:       csrc/cpu/hidden_mse.cpp (fwd writes the gradients; bwd scales them)
    triton:    kdfast/kernels/triton/hidden_mse.py (fwd writes the gradients; bwd scales them)
    cuda:      none (Triton on GPU)
    reference: this file (hidden_mse_reference, hidden_cosine_reference)
    backward:  kdfast/ops/loss_grad_autograd.py (16-bit GPU inputs and a second backward rerun
               the fwd kernel with grad_output as the gradient weight)

    hidden_mse    = sum over valid tokens of ||h_s W^T + b - h_t||^2 / (n_valid * D_t)
    hidden_cosine = mean over valid tokens of 1 - cos(h_s W^T + b, h_t)

The CPU kernel works in blocks of rows: project, compare and write the
gradient for h_s, W and b while the block is in cache, so the projected
[N, D_t] activations and their difference never exist as whole tensors. The
Triton backend projects with the vendor GEMM and runs the loss and row
gradient as one fused epilogue in place over the projection. The loss is a
sum, so its gradient is produced in the same run; autograd only scales it.
16-bit hidden states get their gradient in their own dtype (the CPU kernel
converts rows block by block: no float32 copy of h_s, h_t or dh exists), as
for the attention losses (kdfast/ops/loss_grad_autograd.py, forward_grads).
A second backward through the same graph (retain_graph=True) reruns the
forward kernel on the saved inputs with grad_output applied.
"""
from __future__ import annotations

import warnings

import torch

from kdfast import backends
from kdfast.ops import _checks
from kdfast.ops.loss_grad_autograd import forward_grads, grad_dtype, register_loss_grad_autograd

OP = "hidden_mse"
KINDS = {"mse": 0, "cosine": 1}


def _project(h_s, weight, bias, acc):
    y = h_s.to(acc)
    if weight is not None:
        y = y @ weight.to(acc).t()
    if bias is not None:
        y = y + bias.to(acc)
    return y


def _check(h_s, h_t, weight, bias, mask, fn):
    _checks.tensor("student_hidden", h_s, dtypes=_checks.FLOAT_DTYPES, min_ndim=1)
    _checks.tensor("teacher_hidden", h_t, dtypes=_checks.FLOAT_DTYPES, min_ndim=1)
    _checks.same_device(student_hidden=h_s, teacher_hidden=h_t, proj_weight=weight, proj_bias=bias, mask=mask)
    if h_s.shape[:-1] != h_t.shape[:-1]:
        raise ValueError(f"{fn}: student_hidden {tuple(h_s.shape)} and teacher_hidden {tuple(h_t.shape)} must "
                         "agree in all but the last dim")
    Ds, Dt = h_s.shape[-1], h_t.shape[-1]
    if weight is not None:
        _checks.tensor("proj_weight", weight, dtypes=_checks.FLOAT_DTYPES, ndim=2)
        if tuple(weight.shape) != (Dt, Ds):
            raise ValueError(f"proj_weight must be [D_teacher={Dt}, D_student={Ds}] (nn.Linear layout), got "
                             f"{tuple(weight.shape)}")
    elif Ds != Dt:
        raise ValueError(f"{fn}: hidden sizes differ (student {Ds}, teacher {Dt}); pass proj_weight [{Dt}, {Ds}]")
    if bias is not None:
        _checks.tensor("proj_bias", bias, dtypes=_checks.FLOAT_DTYPES, ndim=1)
        if bias.shape[0] != Dt:
            raise ValueError(f"proj_bias must be [D_teacher={Dt}], got {tuple(bias.shape)}")
    lead = h_s.shape[:-1]
    if mask is None:
        m = torch.ones(lead, dtype=torch.float32, device=h_s.device)
    else:
        _checks.tensor("mask", mask)
        if mask.shape != lead:
            raise ValueError(f"mask must have the leading shape of the hidden states {tuple(lead)} (1 = keep), "
                             f"got {tuple(mask.shape)}")
        m = (mask != 0).to(torch.float32)
    return m.reshape(-1).contiguous()


def _rows_reference(h_s, h_t, weight, bias, mask, kind, eps):
    acc = torch.float64 if h_s.dtype == torch.float64 else torch.float32
    y = _project(h_s, weight, bias, acc)
    t = h_t.to(acc)
    if kind == 0:
        rows = ((y - t) ** 2).sum(-1)
    else:
        rows = 1 - torch.nn.functional.cosine_similarity(y, t, dim=-1, eps=eps)
    return torch.where(mask != 0, rows, torch.zeros((), dtype=acc, device=rows.device))


def _loss_reference(student_hidden, teacher_hidden, proj_weight, proj_bias, mask, kind, eps, fn):
    m = _check(student_hidden, teacher_hidden, proj_weight, proj_bias, mask, fn)
    Dt = teacher_hidden.shape[-1]
    rows = _rows_reference(student_hidden.reshape(-1, student_hidden.shape[-1]), teacher_hidden.reshape(-1, Dt),
                           proj_weight, proj_bias, m, KINDS[kind], eps)
    count = m.sum().to(rows.dtype) * (Dt if kind == "mse" else 1)
    return rows.sum() / count.clamp(min=1)


def hidden_mse_reference(student_hidden, teacher_hidden, proj_weight=None, proj_bias=None, mask=None):
    """The specification of :func:`hidden_mse` (autograd through PyTorch); float32, or float64 for float64
    inputs."""
    return _loss_reference(student_hidden, teacher_hidden, proj_weight, proj_bias, mask, "mse", 1e-8,
                           "hidden_mse_reference")


def hidden_cosine_reference(student_hidden, teacher_hidden, proj_weight=None, proj_bias=None, mask=None, *,
                            eps=1e-8):
    """The specification of :func:`hidden_cosine` (autograd through PyTorch); float32, or float64 for float64
    inputs."""
    eps = _checks.positive("eps", eps)
    return _loss_reference(student_hidden, teacher_hidden, proj_weight, proj_bias, mask, "cosine", eps,
                           "hidden_cosine_reference")


def hidden_loss_reference(student_hidden, teacher_hidden, proj_weight=None, proj_bias=None, mask=None, *,
                          kind="mse", eps=1e-8):
    """Deprecated (goes in the next release): :func:`hidden_mse_reference` (kind="mse") or
    :func:`hidden_cosine_reference` (kind="cosine"), each with its op's signature."""
    _checks.choice("kind", kind, tuple(KINDS))
    warnings.warn(f"hidden_loss_reference(kind=...) is deprecated: use hidden_{kind}_reference", DeprecationWarning,
                  stacklevel=2)
    return _loss_reference(student_hidden, teacher_hidden, proj_weight, proj_bias, mask, kind, eps,
                           "hidden_loss_reference")


# --------------------------------------------------------------------------
# Custom op: loss sum over valid rows and (when compute_grad) the gradients
# of that sum for h_s, weight, bias (float32 units; with grad_weight, times it in
# the inputs' dtypes; empty when not computed).
# --------------------------------------------------------------------------
@torch.library.custom_op("kdfast::hidden_mse_fwd", mutates_args=())
def _fwd(h_s: torch.Tensor, h_t: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
         mask: torch.Tensor, kind: int, eps: float, compute_grad: bool, grad_weight: torch.Tensor | None,
         backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return backends.run(OP, h_s, h_t, weight, bias, mask, kind, eps, compute_grad, grad_weight,
                        backend=backend or None)


@_fwd.register_fake
def _(h_s, h_t, weight, bias, mask, kind, eps, compute_grad, grad_weight, backend):
    def grad_like(x):
        if not compute_grad or x is None:
            return h_s.new_empty((0,), dtype=torch.float32)
        return x.new_empty(x.shape, dtype=grad_dtype(x, grad_weight))

    return h_s.new_empty((), dtype=torch.float32), grad_like(h_s), grad_like(weight), grad_like(bias)


# The teacher h_t is a constant.
register_loss_grad_autograd(_fwd, grads_for=("h_s", "weight", "bias"))


@backends.register(OP, "reference")
def _fwd_reference(h_s, h_t, weight, bias, mask, kind, eps, compute_grad, grad_weight):
    """Whole-tensor PyTorch with the gradient written out (row gradient gy = d row / d y)."""
    acc = torch.float64 if h_s.dtype == torch.float64 else torch.float32
    y = _project(h_s, weight, bias, acc)
    t = h_t.to(acc)
    keep = (mask != 0)[:, None]
    zero = torch.zeros((), dtype=acc, device=y.device)
    if kind == 0:
        diff = torch.where(keep, y - t, zero)
        loss = (diff * diff).sum()
        gy = 2 * diff
    else:
        ny, nt = y.norm(dim=-1, keepdim=True), t.norm(dim=-1, keepdim=True)
        den = (ny * nt).clamp(min=eps)
        cos = (y * t).sum(-1, keepdim=True) / den
        loss = torch.where(keep, 1 - cos, zero).sum()
        c = torch.where((ny * nt > eps) & (ny > 0), cos / (ny * ny).clamp(min=1e-300), zero)
        gy = torch.where(keep, -t / den + c * y, zero)
    loss = loss.float()
    empty = h_s.new_empty((0,), dtype=torch.float32)
    if not compute_grad:
        return loss, empty, empty.clone(), empty.clone()
    if grad_weight is not None:
        gy = gy * grad_weight.to(acc)
    dh = gy @ weight.to(acc) if weight is not None else gy
    dw = gy.t() @ h_s.to(acc) if weight is not None else empty
    db = gy.sum(0) if bias is not None else empty.clone()
    return (loss, *(g.to(grad_dtype(x, grad_weight)) if x is not None else g.float()
                    for g, x in ((dh, h_s), (dw, weight), (db, bias))))


# What the cpu and triton kernels take (kdfast.backends checks it; explain() reports it).
KERNEL_LIMITS = backends.Limits(dtypes=backends.kernel_dtypes("h_s", "h_t", "weight", "bias"))


@backends.register(OP, "cpu", limits=KERNEL_LIMITS, kernel="hidden_mse_fwd")
def _fwd_cpu(h_s, h_t, weight, bias, mask, kind, eps, compute_grad, grad_weight):
    return torch.ops.kdfast_C.hidden_mse_fwd(h_s, h_t, weight, bias, mask, kind, eps, compute_grad, grad_weight)


@backends.register(OP, "triton", limits=KERNEL_LIMITS)
def _fwd_triton(h_s, h_t, weight, bias, mask, kind, eps, compute_grad, grad_weight):
    from kdfast.kernels.triton import hidden_mse as k
    return k.hidden_mse_fwd(h_s, h_t, weight, bias, mask, kind, eps, compute_grad, grad_weight)


backends.set_gpu_order(OP, ("triton",))


def _hidden_loss(h_s, h_t, weight, bias, mask, kind, eps, fn):
    m = _check(h_s, h_t, weight, bias, mask, fn)
    Ds, Dt = h_s.shape[-1], h_t.shape[-1]
    hs2, ht2 = h_s.reshape(-1, Ds), h_t.reshape(-1, Dt)
    backend = "" if torch.compiler.is_compiling() else backends.explain(OP, hs2, ht2, weight, bias).backend
    count = (m.sum() * (Dt if kind == "mse" else 1)).clamp(min=1)
    grad = forward_grads((h_s, weight, bias), count)
    loss, _, _, _ = _fwd(hs2, ht2, weight, bias, m, KINDS[kind], float(eps), *grad, backend)
    return loss / count


def hidden_mse(student_hidden, teacher_hidden, proj_weight=None, proj_bias=None, mask=None):
    """TinyBERT hidden-state / embedding loss MSE(h_s W^T + b, h_t) over unmasked tokens.

    Args:
        student_hidden: ``[..., D_s]`` (e.g. ``[B, L, D_s]``), float32/bfloat16/float16 (float64:
            reference backend). Gets a gradient.
        teacher_hidden: ``[..., D_t]``, same leading shape. Gets no gradient.
        proj_weight: optional ``[D_t, D_s]`` (``nn.Linear(D_s, D_t).weight``); required when
            D_s != D_t. proj_bias: optional ``[D_t]``. Both get gradients.
        mask: optional ``[...]`` (the leading shape, e.g. ``[B, L]``) bool/integer/float, nonzero = keep.

    Returns float32 0-d: sum of squared errors over valid tokens / (n_valid * D_t); 0 if none.

    The gradients are computed in the forward; the first backward only scales them (float32),
    or hands them over in the inputs' dtypes (16-bit on the CPU; other grad_outputs than 1
    multiply them in place, one more rounding). A second backward through the same graph
    (retain_graph=True) recomputes them from the saved inputs.

    Equivalent PyTorch::

        y = F.linear(student_hidden, proj_weight, proj_bias)
        F.mse_loss(y[mask.bool()], teacher_hidden[mask.bool()])
    """
    return _hidden_loss(student_hidden, teacher_hidden, proj_weight, proj_bias, mask, "mse", 1e-8, "hidden_mse")


def hidden_cosine(student_hidden, teacher_hidden, proj_weight=None, proj_bias=None, mask=None, *, eps=1e-8):
    """DistilBERT cosine hidden loss: mean over unmasked tokens of 1 - cos(h_s W^T + b, h_t).

    Same arguments as :func:`hidden_mse`. Returns float32 0-d. Gradients as in :func:`hidden_mse`
    (a second backward through the same graph recomputes them).

    Equivalent PyTorch::

        y = F.linear(student_hidden, proj_weight, proj_bias)
        (1 - F.cosine_similarity(y, teacher_hidden, dim=-1, eps=eps))[mask.bool()].mean()
    """
    eps = _checks.positive("eps", eps)
    return _hidden_loss(student_hidden, teacher_hidden, proj_weight, proj_bias, mask, "cosine", eps,
                        "hidden_cosine")
