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


def save_inputs(ctx, inputs):
    """Keep the op's inputs for a recompute in a later backward: tensors as saved tensors (inputs,
    so no new memory; autograd also checks that they were not modified in place), the rest as is."""
    tensors = [x if isinstance(x, torch.Tensor) else None for x in inputs]
    ctx.save_for_backward(*tensors)
    ctx.other_args = [None if isinstance(x, torch.Tensor) else x for x in inputs]


def recompute_units(ctx, op, grad_flag: int, n_units: int):
    """Unit gradients for a backward after the first: rerun the forward op with gradients on."""
    args = [x if x is not None else a for x, a in zip(ctx.saved_tensors, ctx.other_args)]
    args[grad_flag] = True
    with torch.no_grad():
        out = op(*args)
    return list(out[1:1 + n_units])


def register_unit_grad_autograd(op, name: str, *, n_grads: int = 2, grad_flag: int = 7):
    """Autograd of an op returning (loss [B, H], d(sum loss)/d input 0, ..., d input n_grads-1).

    The forward already wrote the "unit" gradients; the first backward only
    scales them by grad_output, in place for float32 inputs, so a step's peak
    holds one gradient buffer per input instead of two. A later backward through
    the same graph (retain_graph=True) reruns the forward op with gradients on the
    saved inputs and scales those. The teacher gets no gradient. ``grad_flag`` is
    the index of the op's compute_grad argument.
    """

    def setup_context(ctx, inputs, output):
        ctx.mark_non_differentiable(*output[1:])
        # Without this, autograd hands the backward zero-filled [B, H, L, D] gradients for the
        # non-differentiable outputs: 38 MB each, allocated and zeroed per step at B=32, L=384.
        ctx.set_materialize_grads(False)
        # Attributes, not saved tensors: the first backward consumes them in place.
        ctx.units = list(output[1:1 + n_grads])
        ctx.dtypes = tuple(x.dtype for x in inputs[:n_grads])
        ctx.compute_grad = inputs[grad_flag]
        save_inputs(ctx, inputs)

    def backward(ctx, grad_bh, *_):
        grads = [None] * len(ctx.other_args)
        if not (ctx.compute_grad and grad_bh is not None and any(ctx.needs_input_grad[:n_grads])):
            ctx.units = None
            return tuple(grads)
        if ctx.units is None:  # a second backward (retain_graph=True): recompute
            units = recompute_units(ctx, op, grad_flag, n_grads)
        else:
            units, ctx.units = ctx.units, None
        g = grad_bh.float()[:, :, None, None]
        for i in range(n_grads):
            if ctx.needs_input_grad[i]:
                grads[i] = scaled_unit_grad(units[i], g, ctx.dtypes[i])
        return tuple(grads)

    op.register_autograd(backward, setup_context=setup_context)
