"""Argument checks shared by the attention distillation ops (attention_score_mse, attention_kl)."""
from __future__ import annotations

import math

import torch

from kdfast.ops import _checks

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check(q_s, k_s, q_t, k_t, mask, scale_s, scale_t, op):
    """Validate [B, H, L, D] student/teacher q and k and the [B, L] mask.

    Returns (mask as contiguous float32 [B, L] with 1 = keep, scale_s, scale_t).
    """
    for name, x in (("q_s", q_s), ("k_s", k_s), ("q_t", q_t), ("k_t", k_t)):
        _checks.tensor(name, x, dtypes=_checks.FLOAT_DTYPES, ndim=4)
    _checks.same_device(q_s=q_s, k_s=k_s, q_t=q_t, k_t=k_t, mask=mask)
    if k_s.shape != q_s.shape:
        raise ValueError(f"{op}: k_s must have the shape of q_s {tuple(q_s.shape)}, got {tuple(k_s.shape)}")
    if k_t.shape != q_t.shape:
        raise ValueError(f"{op}: k_t must have the shape of q_t {tuple(q_t.shape)}, got {tuple(k_t.shape)}")
    B, H, L, Ds = q_s.shape
    if q_t.shape[1] != H:
        raise ValueError(f"{op}: student and teacher must have the same number of heads, got q_s with {H} and "
                         f"q_t with {q_t.shape[1]} (map heads first, e.g. average teacher heads); head dims may "
                         "differ")
    if q_t.shape[0] != B or q_t.shape[2] != L:
        raise ValueError(f"{op}: q_t must be [B={B}, H={H}, L={L}, D_t], got {tuple(q_t.shape)}")
    if Ds == 0 or q_t.shape[3] == 0:
        raise ValueError(f"{op}: head dims must be >= 1, got {Ds} (student) and {q_t.shape[3]} (teacher)")
    if mask is None:
        m = torch.ones(B, L, dtype=torch.float32, device=q_s.device)
    else:
        _checks.tensor("mask", mask, ndim=2)
        if tuple(mask.shape) != (B, L):
            raise ValueError(f"mask must be [B={B}, L={L}] (1 = keep), got {tuple(mask.shape)}")
        m = (mask != 0).to(torch.float32).contiguous()
    scale_s = 1.0 / math.sqrt(Ds) if scale_s is None else _checks.positive("scale_s", scale_s)
    scale_t = 1.0 / math.sqrt(q_t.shape[3]) if scale_t is None else _checks.positive("scale_t", scale_t)
    return m, float(scale_s), float(scale_t)


def kernel_check(q_s, k_s, q_t, k_t, *rest):
    for name, x in (("q_s", q_s), ("k_s", k_s), ("q_t", q_t), ("k_t", k_t)):
        if x.dtype not in KERNEL_DTYPES:
            return f"{name} dtype {x.dtype} not supported by kernels (float32/bfloat16/float16)"
    return None


def wants_grad(*xs) -> bool:
    return torch.is_grad_enabled() and any(x.requires_grad for x in xs)


def pair_mask(mask: torch.Tensor) -> torch.Tensor:
    """[B, 1, L, L] bool: query i and key j both kept."""
    keep = mask != 0
    return keep[:, None, :, None] & keep[:, None, None, :]


def scaled_unit_grad(unit: torch.Tensor, g: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """grad = g * unit in ``dtype``; in place for float32 outside tracing (unit is a private buffer)."""
    # type() check: under tracing (aot_autograd, fake tensors) units are tensor subclasses; stay functional there.
    if dtype == torch.float32 and type(unit) is torch.Tensor and not torch.compiler.is_compiling() \
            and not unit.requires_grad:
        return unit.mul_(g)
    return (g * unit).to(dtype)


def fake_pair_loss(q_s, k_s, q_t, k_t, mask, scale_s, scale_t, compute_grad, backend):
    """Fake impl shared by the attention-map loss ops: per-(b, h) loss and two unit gradients."""
    B, H, L, D = q_s.shape
    loss = q_s.new_empty((B, H), dtype=torch.float32)
    g = (B, H, L, D) if compute_grad else (0,)
    return loss, q_s.new_empty(g, dtype=torch.float32), q_s.new_empty(g, dtype=torch.float32)


def register_unit_grad_autograd(op, name: str):
    """Autograd of an op returning (loss [B, H], d(sum loss)/dq_s, d(sum loss)/dk_s).

    The forward already wrote the "unit" gradients; the backward only scales
    them by grad_output, in place for float32 inputs, so a step's peak holds one
    gradient buffer per input instead of two. The teacher gets no gradient.
    """

    def setup_context(ctx, inputs, output):
        q_s, k_s = inputs[0], inputs[1]
        ctx.mark_non_differentiable(output[1], output[2])
        # Without this, autograd hands the backward zero-filled [B, H, L, D] gradients for the two
        # non-differentiable outputs: 2 x 38 MB allocated and zeroed per step at B=32, L=384.
        ctx.set_materialize_grads(False)
        # Attributes, not saved tensors: the backward consumes them in place.
        ctx.units = [output[1], output[2]]
        ctx.dtypes = (q_s.dtype, k_s.dtype)
        ctx.compute_grad = inputs[7]

    def backward(ctx, grad_bh, _g1, _g2):
        if ctx.units is None:
            raise RuntimeError(f"kdfast {name}: backward ran twice through the same loss (retain_graph=True); "
                               "recompute the loss for a second backward")
        dq_unit, dk_unit = ctx.units
        ctx.units = None
        dq = dk = None
        if ctx.compute_grad and grad_bh is not None:
            g = grad_bh.float()[:, :, None, None]
            if ctx.needs_input_grad[0]:
                dq = scaled_unit_grad(dq_unit, g, ctx.dtypes[0])
            if ctx.needs_input_grad[1]:
                dk = scaled_unit_grad(dk_unit, g, ctx.dtypes[1])
        return dq, dk, None, None, None, None, None, None, None

    op.register_autograd(backward, setup_context=setup_context)
