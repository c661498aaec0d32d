"""Argument checks and gradient plumbing shared by the layer distillation ops (attention_score_mse,
attention_kl; the autograd and forward_grads also serve hidden_mse)."""
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


def forward_grads(students, count, shape=()):
    """(compute_grad, grad_weight) for the forward op call of a loss ``loss_parts.sum() / count``.

    ``students``: the tensors that get gradients (None entries are skipped); ``shape``: the
    shape of the op's loss output ([B, H] for the attention losses, () for the hidden loss).

    - float32 students: float32 unit gradients from the forward, scaled in place by the
      backward: (True, None).
    - 16-bit CPU students: the forward writes the gradient of the mean itself in the
      students' dtype (grad_weight = 1 / count for every head, > 0); the backward hands
      it over when grad_output is exactly 1 (``loss.backward()``, or a weight of 1.0)
      and otherwise multiplies it by grad_output in place: one more rounding (at most
      1 ulp of the 16-bit result instead of 0.5), no recompute (bf16 attention_kl, B=32,
      L=384, fwd+bwd at grad_output 0.5, 2-core EPYC: recomputing 259 ms, scaling in
      place 135 ms; 145 ms at grad_output 1).
    - 16-bit students elsewhere (CUDA: comparing grad_output would be a host sync; under
      torch.compile): the backward computes the gradient: (False, None).

    A float32 unit gradient for 16-bit students would be twice the size of the result, plus
    the copy (B=32, L=384, H=12, D=64, bf16: 144 MiB at the peak instead of 36).
    ``count`` is the loss's clamped denominator (a tensor: no host sync).
    """
    students = [x for x in students if x is not None]
    if not wants_grad(*students):
        return False, None
    if all(x.dtype == torch.float32 for x in students):
        return True, None
    if students[0].device.type == "cpu" and not torch.compiler.is_compiling():
        # torch.div(1, count) is bit for bit what autograd hands the loss's per-head terms at grad_output 1.
        w = torch.div(torch.ones((), dtype=count.dtype, device=count.device), count)
        return True, w.expand(shape).contiguous()
    return False, None


def grad_dtype(x: torch.Tensor, grad_weight) -> torch.dtype:
    """Dtype of the gradients the attention-loss ops return for input x: float32 unit
    gradients without grad_weight, x's dtype with it."""
    return torch.float32 if grad_weight is None else x.dtype


def pair_mask(mask: torch.Tensor) -> torch.Tensor:
    """[B, 1, L, L] bool: query i and key j both kept."""
    keep = mask != 0
    return keep[:, None, :, None] & keep[:, None, None, :]


def scaled_unit_grad(unit: torch.Tensor, g: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """grad = g * unit in ``dtype`` (g broadcast over unit's trailing dims); in place when unit already
    has that dtype, outside tracing (unit is a private buffer; a 16-bit unit is multiplied in float32
    and rounded once more)."""
    g = g.float().reshape(tuple(g.shape) + (1,) * (unit.dim() - g.dim()))
    # type() check: under tracing (aot_autograd, fake tensors) units are tensor subclasses; stay functional there.
    if unit.dtype == dtype and type(unit) is torch.Tensor and not torch.compiler.is_compiling() \
            and not unit.requires_grad:
        return unit.mul_(g)
    return (g * unit).to(dtype)


def fake_pair_loss(q_s, k_s, q_t, k_t, mask, scale_s, scale_t, compute_grad, grad_weight, backend):
    """Fake impl shared by the attention-map loss ops: per-(b, h) loss and two gradients."""
    B, H, L, D = q_s.shape
    loss = q_s.new_empty((B, H), dtype=torch.float32)
    if not compute_grad:
        return loss, q_s.new_empty((0,), dtype=torch.float32), q_s.new_empty((0,), dtype=torch.float32)
    return (loss, q_s.new_empty((B, H, L, D), dtype=grad_dtype(q_s, grad_weight)),
            k_s.new_empty((B, H, L, D), dtype=grad_dtype(k_s, grad_weight)))


def weighted(dq, dk, q_s, k_s, grad_weight):
    """Reference backends: unit gradients times grad_weight[b, h], in the inputs' dtypes."""
    if grad_weight is None:
        return dq.float(), dk.float()
    w = grad_weight.to(dq.dtype)[:, :, None, None]
    return (w * dq).to(q_s.dtype), (w * dk).to(k_s.dtype)


def save_inputs(ctx, inputs):
    """Keep the op's inputs for a recompute in a later backward: tensors as saved tensors (inputs,
    so no new memory; autograd also checks that they were not modified in place), the rest as is."""
    tensors = [x if isinstance(x, torch.Tensor) else None for x in inputs]
    ctx.save_for_backward(*tensors)
    ctx.other_args = [None if isinstance(x, torch.Tensor) else x for x in inputs]


def _rerun(ctx, op, set_args):
    """Rerun the op on the inputs save_inputs kept, with some arguments replaced ({index: value})."""
    args = [x if x is not None else a for x, a in zip(ctx.saved_tensors, ctx.other_args)]
    for i, v in set_args.items():
        args[i] = v
    with torch.no_grad():
        return op(*args)


def weighted_grads(ctx, op, grad_flag: int, n_grads: int, grad_out):
    """Gradients grad_out * d loss / d input (per loss entry) in the inputs' dtypes: rerun the op
    on the saved inputs with compute_grad and grad_weight = grad_out."""
    out = _rerun(ctx, op, {grad_flag: True, grad_flag + 1: grad_out.float().contiguous()})
    return list(out[1:1 + n_grads])


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equal, in eager mode only: under tracing (fake tensors) the answer would be data-dependent,
    so there it is False and the backward takes the (functional) rescaling path."""
    if torch.compiler.is_compiling() or type(a) is not torch.Tensor or type(b) is not torch.Tensor:
        return False
    return torch.equal(a, b)


def _rescale_held(h: torch.Tensor, ratio: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """h * ratio (ratio: one factor per loss entry, h's leading dims), in place in h's 16-bit dtype.

    A Python-number factor keeps the in-place multiply in h's dtype (float32 arithmetic, one
    rounding, no temporary); a float32 tensor factor would make TensorIterator allocate a float32
    copy of h. The ratio is one number in the public functions (grad_output); otherwise head by head.
    """
    if type(h) is not torch.Tensor or torch.compiler.is_compiling() or h.dtype != dtype:
        return scaled_unit_grad(h, ratio, dtype)
    r = ratio.reshape(-1)
    if bool((r == r[0]).all()):
        return h.mul_(float(r[0]))
    for part, f in zip(h.view(r.numel(), -1), r.tolist()):
        part.mul_(f)
    return h


def register_unit_grad_autograd(op, *, grad_inputs=(0, 1), grad_flag: int = 7):
    """Autograd of an op returning (loss, d(sum loss)/d input grad_inputs[0], ..., one per grad_inputs):
    the loss is [B, H] for the attention losses, 0-d for the hidden loss.

    See forward_grads. When the forward ran with compute_grad and no grad_weight
    (float32 students) it already wrote the "unit" gradients; the first backward only
    scales them by grad_output, in place, so a step's peak holds one gradient buffer per
    input instead of two. With a grad_weight (16-bit CPU students) the forward wrote
    weighted gradients in the inputs' dtype; the backward returns them when grad_output
    equals that weight, else scales them in place by grad_output / weight. Otherwise
    (16-bit students off the CPU), and in a later backward through the same graph
    (retain_graph=True), the backward reruns the op on the saved inputs with
    grad_weight = grad_output: the kernel writes the final gradients in the inputs'
    dtype (one rounding). The teacher gets no gradient. ``grad_flag`` is the index of
    the op's compute_grad argument; grad_weight follows it.
    """

    n_grads = len(grad_inputs)

    def setup_context(ctx, inputs, output):
        ctx.mark_non_differentiable(*output[1:])
        # Without this, autograd hands the backward zero-filled [B, H, L, D] gradients for the
        # non-differentiable outputs: 38 MB each, allocated and zeroed per step at B=32, L=384.
        ctx.set_materialize_grads(False)
        # Attributes, not saved tensors: the first backward consumes them in place.
        computed, weight = inputs[grad_flag], inputs[grad_flag + 1]
        ctx.units = list(output[1:1 + n_grads]) if computed and weight is None else None
        ctx.held = list(output[1:1 + n_grads]) if computed and weight is not None else None
        ctx.held_weight = weight if ctx.held is not None else None
        ctx.dtypes = tuple(None if inputs[i] is None else inputs[i].dtype for i in grad_inputs)
        save_inputs(ctx, inputs)

    def backward(ctx, grad_bh, *_):
        grads = [None] * len(ctx.other_args)
        held, weight, ctx.held, ctx.held_weight = ctx.held, ctx.held_weight, None, None
        wanted = [ctx.needs_input_grad[i] for i in grad_inputs]
        if grad_bh is None or not any(wanted):
            ctx.units = None
            return tuple(grads)
        if held is not None:
            if _same_values(grad_bh, weight):  # grad_output 1: the forward's gradients as they are
                computed = held
            else:  # in place, by grad_output (weight > 0: forward_grads' 1 / count)
                ratio = grad_bh.float() / weight
                computed = [_rescale_held(h, ratio, dt) if w else None
                            for h, dt, w in zip(held, ctx.dtypes, wanted)]
        elif ctx.units is None:  # 16-bit students off the CPU, or a second backward: the kernel applies it
            computed = weighted_grads(ctx, op, grad_flag, n_grads, grad_bh)
        else:
            units, ctx.units = ctx.units, None
            computed = [scaled_unit_grad(u, grad_bh, dt) if w else None
                        for u, dt, w in zip(units, ctx.dtypes, wanted)]
        for k, i in enumerate(grad_inputs):
            if wanted[k]:
                grads[i] = computed[k]
        return tuple(grads)

    op.register_autograd(backward, setup_context=setup_context)
