"""Autograd of the loss ops whose forward also writes the gradient of the loss sum.

attention_kl, attention_score_mse and hidden_mse are sums, so their kernels know
d(loss sum)/d(input) during the forward pass. Their forward custom op returns
``(loss, grad of the first input named in grads_for, grad of the second, ...)``
and takes two arguments by name:

- ``compute_grad`` (bool): write the gradients (else they are empty);
- ``grad_weight`` (optional float32 tensor, one weight per loss entry): the
  gradients are then ``grad_weight * d loss / d input`` in the inputs' dtypes,
  instead of float32 "unit" gradients.

:func:`forward_grads` picks those two arguments for an eager call;
:func:`register_loss_grad_autograd` gives the op a backward that scales, hands
over or recomputes them. The teacher inputs get no gradient.
"""
from __future__ import annotations

import torch

__all__ = ["forward_grads", "grad_dtype", "register_loss_grad_autograd", "wants_grad"]


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
    """Dtype of the gradients these ops return for input x: float32 unit gradients without
    grad_weight, x's dtype with it."""
    return torch.float32 if grad_weight is None else x.dtype


def _scaled_unit_grad(unit: torch.Tensor, g: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """grad = g * unit in ``dtype`` (g broadcast over unit's trailing dims); in place when unit already
    has that dtype, outside tracing (unit is a private buffer; a 16-bit unit is multiplied in float32
    and rounded once more)."""
    g = g.float().reshape(tuple(g.shape) + (1,) * (unit.dim() - g.dim()))
    # type() check: under tracing (aot_autograd, fake tensors) units are tensor subclasses; stay functional there.
    if unit.dtype == dtype and type(unit) is torch.Tensor and not torch.compiler.is_compiling() \
            and not unit.requires_grad:
        return unit.mul_(g)
    return (g * unit).to(dtype)


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
        return _scaled_unit_grad(h, ratio, dtype)
    r = ratio.reshape(-1)
    if bool((r == r[0]).all()):
        return h.mul_(float(r[0]))
    for part, f in zip(h.view(r.numel(), -1), r.tolist()):
        part.mul_(f)
    return h


def _argument_names(op) -> list[str]:
    """The argument names of a torch.library custom op, in schema order."""
    return [a.name for a in op._opoverload._schema.arguments]


def register_loss_grad_autograd(op, *, grads_for: tuple[str, ...]):
    """Autograd of ``op``, a custom op returning (loss, d(sum loss)/d grads_for[0], ..., one per name):
    the loss is [B, H] for the attention losses, 0-d for the hidden loss.

    ``grads_for`` names the op's arguments that receive gradients, in the order of its gradient
    outputs; ``op`` must also take arguments named ``compute_grad`` and ``grad_weight``.

    See forward_grads. When the forward ran with compute_grad and no grad_weight
    (float32 students) it already wrote the "unit" gradients; the first backward only
    scales them by grad_output, in place, so a step's peak holds one gradient buffer per
    input instead of two. With a grad_weight (16-bit CPU students) the forward wrote
    weighted gradients in the inputs' dtype; the backward returns them when grad_output
    equals that weight, else scales them in place by grad_output / weight. Otherwise
    (16-bit students off the CPU), and in a later backward through the same graph
    (retain_graph=True), the backward reruns the op on the saved inputs with
    grad_weight = grad_output: the kernel writes the final gradients in the inputs'
    dtype (one rounding). Every other argument (the teacher) gets no gradient.
    """
    names = _argument_names(op)
    missing = [n for n in (*grads_for, "compute_grad", "grad_weight") if n not in names]
    if missing:
        raise ValueError(f"{op._qualname}: no argument named {', '.join(missing)} (arguments: {', '.join(names)})")
    grad_at = [names.index(n) for n in grads_for]
    flag_at, weight_at = names.index("compute_grad"), names.index("grad_weight")
    n_grads = len(grads_for)

    def setup_context(ctx, inputs, output):
        ctx.mark_non_differentiable(*output[1:])
        # Without this, autograd hands the backward zero-filled [B, H, L, D] gradients for the
        # non-differentiable outputs: 38 MB each, allocated and zeroed per step at B=32, L=384.
        ctx.set_materialize_grads(False)
        # Attributes, not saved tensors: the first backward consumes them in place.
        computed, weight = inputs[flag_at], inputs[weight_at]
        ctx.units = list(output[1:1 + n_grads]) if computed and weight is None else None
        ctx.held = list(output[1:1 + n_grads]) if computed and weight is not None else None
        ctx.held_weight = weight if ctx.held is not None else None
        ctx.dtypes = tuple(None if inputs[i] is None else inputs[i].dtype for i in grad_at)
        # The inputs, for a recompute in a later backward: tensors as saved tensors (inputs, so no new
        # memory; autograd also checks that they were not modified in place), the rest as they are.
        ctx.save_for_backward(*[x if isinstance(x, torch.Tensor) else None for x in inputs])
        ctx.other_args = [None if isinstance(x, torch.Tensor) else x for x in inputs]

    def recompute(ctx, grad_out):
        """grad_out * d loss / d input (per loss entry) in the inputs' dtypes: the op rerun on the saved
        inputs with compute_grad and grad_weight = grad_out."""
        args = [x if x is not None else a for x, a in zip(ctx.saved_tensors, ctx.other_args)]
        args[flag_at], args[weight_at] = True, grad_out.float().contiguous()
        with torch.no_grad():
            return list(op(*args)[1:1 + n_grads])

    def backward(ctx, grad_loss, *_):
        grads = [None] * len(ctx.other_args)
        held, weight, ctx.held, ctx.held_weight = ctx.held, ctx.held_weight, None, None
        wanted = [ctx.needs_input_grad[i] for i in grad_at]
        if grad_loss is None or not any(wanted):
            ctx.units = None
            return tuple(grads)
        if held is not None:
            if _same_values(grad_loss, weight):  # grad_output 1: the forward's gradients as they are
                computed = held
            else:  # in place, by grad_output (weight > 0: forward_grads' 1 / count)
                ratio = grad_loss.float() / weight
                computed = [_rescale_held(h, ratio, dt) if w else None
                            for h, dt, w in zip(held, ctx.dtypes, wanted)]
        elif ctx.units is None:  # 16-bit students off the CPU, or a second backward: the kernel applies it
            computed = recompute(ctx, grad_loss)
        else:
            units, ctx.units = ctx.units, None
            computed = [_scaled_unit_grad(u, grad_loss, dt) if w else None
                        for u, dt, w in zip(units, ctx.dtypes, wanted)]
        for k, i in enumerate(grad_at):
            if wanted[k]:
                grads[i] = computed[k]
        return tuple(grads)

    op.register_autograd(backward, setup_context=setup_context)
