"""Fused LM-head + distillation loss: never materialises the [N, V] logits.

Backends: the logits matmuls are torch ``F.linear`` on every device; the rows run on
the kd_loss kernels (dispatch name "kd_loss"):

    cpu:       csrc/cpu/kd_loss.cpp (per chunk kd_loss_fwd_grad, loss and gradient in one pass;
               kd_loss_fwd when no gradient is wanted)
    triton:    kdfast/kernels/triton/kd_loss.py (fwd, then bwd, per chunk)
    cuda:      csrc/cuda/kd_loss.cu (fwd, then bwd, per chunk)
    reference: this file (fused_linear_kd_loss_reference); per chunk, kd_loss's reference
    backward:  scales the gradients the forward wrote; reduction="none" reruns the chunks

Rows are processed in chunks. For each chunk the student and teacher logits
are computed with ``F.linear`` in the input dtype (the matmul accumulates in
fp32), the kd_loss per-row forward and backward kernels run on the chunk, and
the chunk's gradient logits are folded at once into grad_hidden (written into
the chunk's rows), grad_weight and grad_bias (fp32 accumulators). So the
forward pass also does the backward work, and the real backward only scales
the stored gradients by grad_output (the pattern of Liger's fused linear
losses), except for ``reduction="none"`` (see ``_fwd``).

Peak memory beyond inputs and gradients: three ``[chunk, V]`` buffers
(student logits, teacher logits, gradient logits) plus, for 16-bit weights,
one ``[V, H]`` temporary per chunk for the weight-gradient matmul.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kdfast import backends
from kdfast.ops import _checks
from kdfast.ops.kd_loss import (_DIV_CODE, DIVERGENCES, REDUCTIONS, _canonical_divergence, _combine,
                                kd_loss_reference, validate_labels)

# Default chunk: as many rows as keep one chunk's logits at <= 2^23 elements
# (32 MiB in fp32; 274 rows at V=30522, 65 rows at V=128256). Bigger chunks mean
# fewer passes of the [V, H] fp32 grad_weight accumulator: fwd+bwd CPU time at
# N=2048, V=30522, H=768 (fp32, 2 cores) was 3.4 s at 137 rows, 3.1 s at 274,
# 3.0 s at 549 (eager: 4.2 s); 2^23 keeps most of that gain at half the memory of 2^24.
CHUNK_ELEMENTS = 2 ** 23
_RED_CODE = {r: i for i, r in enumerate(REDUCTIONS)}  # batchmean 0, sum 1, mean 2, none 3
_NONE = _RED_CODE["none"]


def default_chunk_size(V: int) -> int:
    """Rows per chunk so that a chunk's [rows, V] logits hold at most CHUNK_ELEMENTS elements."""
    return max(1, CHUNK_ELEMENTS // max(V, 1))


def fused_linear_kd_loss_reference(student_hidden, student_weight, teacher_hidden, teacher_weight, labels=None, *,
                                   student_bias=None, teacher_bias=None, chunk_size=None, temperature=1.0,
                                   divergence="kl", beta=0.5, soft_weight=1.0, hard_weight=0.0, ignore_index=-100,
                                   reduction="batchmean", scale_by_t2=True):
    """The specification: materialised logits + :func:`kd_loss_reference` (autograd through PyTorch).
    ``chunk_size`` changes nothing here (the reference has no chunks)."""
    s = F.linear(student_hidden, student_weight, student_bias)
    with torch.no_grad():
        t = F.linear(teacher_hidden, teacher_weight, teacher_bias)
    return kd_loss_reference(s, t, labels, temperature=temperature, divergence=divergence, beta=beta,
                             soft_weight=soft_weight, hard_weight=hard_weight, ignore_index=ignore_index,
                             reduction=reduction, scale_by_t2=scale_by_t2)


def _row_coefs(labels, N, V, soft_scale, hard_weight, ignore_index, reduction, device):
    """d loss / d (soft_i, hard_i) for a scalar reduction, as a float32 [2] tensor (no host sync)."""
    if labels is None:
        denom = torch.full((), max(N, 1), dtype=torch.float32, device=device)
    else:
        denom = (labels != ignore_index).sum().clamp(min=1).float()
    c = torch.tensor([soft_scale, hard_weight], dtype=torch.float32, device=device)
    if reduction == 0:
        return c / denom
    if reduction == 1:
        return c
    return c / torch.stack([denom * V, denom])


def _chunk_loop(sh, sw, sb, th, tw, tb, labels, grad_rows, kd_args, chunk, backend, need):
    """Run the chunks. grad_rows: float32 [N, 2] d loss / d rows, or None for forward only.

    need = (hidden, weight, bias) gradient flags. Returns rows [N, 2] float32 and the
    gradients (empty tensors where not needed; grad_weight/grad_bias as fp32 accumulators).
    """
    N, V = sh.shape[0], sw.shape[0]
    rows = torch.empty((N, 2), dtype=torch.float32, device=sh.device)
    want = grad_rows is not None
    acc = torch.float64 if sw.dtype == torch.float64 else torch.float32
    # Distinct empty tensors: a custom op's outputs must not alias each other.
    gh = torch.empty_like(sh, memory_format=torch.contiguous_format) if want and need[0] else sh.new_empty(0)
    gw = torch.zeros(sw.shape, dtype=acc, device=sw.device) if want and need[1] else sw.new_empty(0)
    gb = (torch.zeros(V, dtype=acc, device=sw.device) if want and need[2] and sb is not None
          else sw.new_empty(0))
    fused = want and backend == "cpu" and backends.choose("kd_loss_fwd_grad", sh[:1], th[:1]) == "cpu"
    for i in range(0, N, chunk):
        j = min(i + chunk, N)
        h = sh[i:j]
        s = F.linear(h, sw, sb)
        t = F.linear(th[i:j], tw, tb)
        lab = None if labels is None else labels[i:j]
        if fused:  # loss and logit gradient in one visit of each row
            r, _, g = backends.run("kd_loss_fwd_grad", s, t, lab, *kd_args, 0.0, 0.0, grad_rows[i:j], backend="cpu")
            rows[i:j] = r
        else:
            r, stats = backends.run("kd_loss", s, t, lab, *kd_args, backend=backend)
            rows[i:j] = r
            if not want:
                continue
            g = backends.run("kd_loss_bwd", s, t, lab, stats, grad_rows[i:j], *kd_args, backend=backend)
        del s, t
        if need[0]:
            torch.mm(g, sw, out=gh[i:j])
        if need[1]:
            if g.dtype == acc and h.dtype == acc:
                gw.addmm_(g.t(), h)
            else:  # 16-bit GEMM (fp32 accumulation inside), then fp32 accumulation across chunks
                gw.add_(torch.mm(g.t(), h.to(g.dtype)))
        if gb.numel():
            gb.add_(g.sum(0, dtype=acc))
    return rows, gh, gw, gb


def _kd_args(temperature, div, beta, ignore_index, compute_hard):
    return (float(temperature), int(div), float(beta), int(ignore_index), bool(compute_hard))


@torch.library.custom_op("kdfast::fused_linear_kd_fwd", mutates_args=())
def _fwd(student_hidden: torch.Tensor, student_weight: torch.Tensor, student_bias: torch.Tensor | None,
         teacher_hidden: torch.Tensor, teacher_weight: torch.Tensor, teacher_bias: torch.Tensor | None,
         labels: torch.Tensor | None, temperature: float, div: int, beta: float, soft_weight: float,
         hard_weight: float, ignore_index: int, reduction: int, scale_by_t2: bool, compute_hard: bool,
         chunk_size: int, need_grad: list[bool], backend: str
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (loss, grad_hidden, grad_weight, grad_bias) with gradients for grad_output = 1.

    For reduction "none" the per-row gradient weights are grad_output[i], not known
    until backward, and grad_weight = sum_i grad_output[i] * g_i^T h_i cannot be
    rescaled afterwards; so "none" returns empty gradients here and the backward
    recomputes the chunks (about 1.5x the work of the scalar path, no extra memory).
    """
    N, V = student_hidden.shape[0], student_weight.shape[0]
    soft_scale = soft_weight * (temperature * temperature if scale_by_t2 else 1.0)
    kd_args = _kd_args(temperature, div, beta, ignore_index, compute_hard)
    grad_rows = None
    if reduction != _NONE and any(need_grad):
        coefs = _row_coefs(labels, N, V, soft_scale, hard_weight, ignore_index, reduction, student_hidden.device)
        grad_rows = coefs.expand(N, 2).contiguous()
    rows, gh, gw, gb = _chunk_loop(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
                                   teacher_bias, labels, grad_rows, kd_args, chunk_size, backend or None, need_grad)
    red = REDUCTIONS[reduction]
    loss = _combine(rows, labels, V, temperature, soft_weight, hard_weight, ignore_index, red, scale_by_t2, (N,))
    return loss, gh, gw.to(student_weight.dtype), gb.to(student_weight.dtype)


@_fwd.register_fake
def _(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, labels,
      temperature, div, beta, soft_weight, hard_weight, ignore_index, reduction, scale_by_t2, compute_hard,
      chunk_size, need_grad, backend):
    N = student_hidden.shape[0]
    loss = student_hidden.new_empty((N,) if reduction == _NONE else (), dtype=torch.float32)
    want = reduction != _NONE and any(need_grad)
    gh = (torch.empty_like(student_hidden, memory_format=torch.contiguous_format) if want and need_grad[0]
          else student_hidden.new_empty(0))
    gw = (torch.empty_like(student_weight, memory_format=torch.contiguous_format) if want and need_grad[1]
          else student_weight.new_empty(0))
    has_b = want and need_grad[2] and student_bias is not None
    gb = student_weight.new_empty(student_weight.shape[0]) if has_b else student_weight.new_empty(0)
    return loss, gh, gw, gb


@torch.library.custom_op("kdfast::fused_linear_kd_bwd", mutates_args=())
def _bwd(student_hidden: torch.Tensor, student_weight: torch.Tensor, student_bias: torch.Tensor | None,
         teacher_hidden: torch.Tensor, teacher_weight: torch.Tensor, teacher_bias: torch.Tensor | None,
         labels: torch.Tensor | None, grad_loss: torch.Tensor, temperature: float, div: int, beta: float,
         soft_weight: float, hard_weight: float, ignore_index: int, scale_by_t2: bool, compute_hard: bool,
         chunk_size: int, need_grad: list[bool], backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients for reduction "none": recompute every chunk with grad_rows = grad_loss[i] * (soft, hard) weights."""
    soft_scale = soft_weight * (temperature * temperature if scale_by_t2 else 1.0)
    c = torch.tensor([soft_scale, hard_weight], dtype=torch.float32, device=grad_loss.device)
    grad_rows = (grad_loss.float().unsqueeze(1) * c).contiguous()
    kd_args = _kd_args(temperature, div, beta, ignore_index, compute_hard)
    _, gh, gw, gb = _chunk_loop(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
                                teacher_bias, labels, grad_rows, kd_args, chunk_size, backend or None, need_grad)
    return gh, gw.to(student_weight.dtype), gb.to(student_weight.dtype)


@_bwd.register_fake
def _(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, labels,
      grad_loss, temperature, div, beta, soft_weight, hard_weight, ignore_index, scale_by_t2, compute_hard,
      chunk_size, need_grad, backend):
    gh = (torch.empty_like(student_hidden, memory_format=torch.contiguous_format) if need_grad[0]
          else student_hidden.new_empty(0))
    gw = (torch.empty_like(student_weight, memory_format=torch.contiguous_format) if need_grad[1]
          else student_weight.new_empty(0))
    has_b = need_grad[2] and student_bias is not None
    gb = student_weight.new_empty(student_weight.shape[0]) if has_b else student_weight.new_empty(0)
    return gh, gw, gb


def _setup_context(ctx, inputs, output):
    (sh, sw, sb, th, tw, tb, labels, temperature, div, beta, soft_weight, hard_weight, ignore_index, reduction,
     scale_by_t2, compute_hard, chunk_size, need_grad, backend) = inputs
    ctx.mark_non_differentiable(*output[1:])
    # No zero-filled gradients for the gradient outputs (autograd would allocate e.g. a [V, H] zero tensor).
    ctx.set_materialize_grads(False)
    ctx.reduction = reduction
    ctx.need_grad = need_grad
    if reduction == _NONE:
        ctx.save_for_backward(sh, sw, sb, th, tw, tb, labels)
        ctx.args = (temperature, div, beta, soft_weight, hard_weight, ignore_index, scale_by_t2, compute_hard,
                    chunk_size, need_grad, backend)
    else:
        ctx.save_for_backward(output[1], output[2], output[3])


def _backward(ctx, grad_loss, _gh, _gw, _gb):
    if grad_loss is None:
        return (None,) * 19
    if ctx.reduction == _NONE:
        sh, sw, sb, th, tw, tb, labels = ctx.saved_tensors
        gh, gw, gb = _bwd(sh, sw, sb, th, tw, tb, labels, grad_loss.contiguous(), *ctx.args)
    else:
        gh, gw, gb = (g * grad_loss.to(g.dtype) for g in ctx.saved_tensors)
    need = ctx.need_grad
    out = [gh if need[0] else None, gw if need[1] else None, gb if need[2] and gb.numel() else None]
    # The teacher is a constant in distillation: it gets no gradient.
    return (*out, *([None] * 16))


_fwd.register_autograd(_backward, setup_context=_setup_context)


def _check_linear(prefix, hidden, weight, bias):
    _checks.tensor(f"{prefix}_hidden", hidden, dtypes=_checks.FLOAT_DTYPES, min_ndim=1)
    _checks.tensor(f"{prefix}_weight", weight, dtypes=_checks.FLOAT_DTYPES, ndim=2)
    if weight.dtype != hidden.dtype:
        raise TypeError(f"{prefix}_weight dtype {weight.dtype} must match {prefix}_hidden dtype {hidden.dtype}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"{prefix}_weight must be [V, {hidden.shape[-1]}] to match {prefix}_hidden "
                         f"{tuple(hidden.shape)}, got {tuple(weight.shape)}")
    if bias is not None:
        _checks.tensor(f"{prefix}_bias", bias, dtypes=(weight.dtype,), ndim=1)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"{prefix}_bias must be [{weight.shape[0]}], got {tuple(bias.shape)}")


def fused_linear_kd_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, labels=None, *,
                         student_bias=None, teacher_bias=None, chunk_size=None, temperature=1.0, divergence="kl",
                         beta=0.5, soft_weight=1.0, hard_weight=0.0, ignore_index=-100, reduction="batchmean",
                         scale_by_t2=True):
    """Distillation loss on LM-head outputs without materialising the ``[N, V]`` logits.

    Args:
        student_hidden: ``[..., Hs]`` float32/bfloat16/float16 (float64 runs the reference kernels).
        student_weight: ``[V, Hs]``, same dtype; student_bias: optional ``[V]``.
        teacher_hidden: ``[..., Ht]`` with the same leading dims (Ht may differ from Hs);
            teacher_weight ``[V, Ht]``; teacher_bias optional ``[V]``. The teacher gets no gradient.
        labels: optional ``[...]`` int64 targets in ``[0, V)`` or ``ignore_index``.
        chunk_size: rows per chunk; default ``default_chunk_size(V)`` (chunk logits
            <= 2^23 elements). Smaller chunks lower memory, larger ones make bigger GEMMs.
        temperature, divergence, beta, soft_weight, hard_weight, ignore_index,
        reduction, scale_by_t2: as :func:`kdfast.ops.kd_loss`.

    Gradients flow to student_hidden, student_weight and student_bias; they are
    computed during the forward (so a forward under ``torch.no_grad()`` or with no
    student tensor requiring grad skips that work). Returns float32 (``[...]`` for "none").

    Equivalent PyTorch::

        kd_loss(F.linear(student_hidden, student_weight, student_bias),
                F.linear(teacher_hidden, teacher_weight, teacher_bias).detach(), labels, **options)
    """
    _check_linear("student", student_hidden, student_weight, student_bias)
    _check_linear("teacher", teacher_hidden, teacher_weight, teacher_bias)
    if teacher_hidden.shape[:-1] != student_hidden.shape[:-1]:
        raise ValueError(f"teacher_hidden leading dims {tuple(teacher_hidden.shape[:-1])} must match "
                         f"student_hidden's {tuple(student_hidden.shape[:-1])}")
    if teacher_weight.shape[0] != student_weight.shape[0]:
        raise ValueError(f"teacher_weight must have V={student_weight.shape[0]} rows like student_weight, "
                         f"got {tuple(teacher_weight.shape)}")
    _checks.same_device(student_hidden=student_hidden, student_weight=student_weight, student_bias=student_bias,
                        teacher_hidden=teacher_hidden, teacher_weight=teacher_weight, teacher_bias=teacher_bias,
                        labels=labels)
    temperature = _checks.positive("temperature", temperature)
    _checks.choice("divergence", divergence, DIVERGENCES)
    _checks.choice("reduction", reduction, REDUCTIONS)
    beta = _checks.in_unit("beta", beta)
    V = student_weight.shape[0]
    if V == 0:
        raise ValueError("student_weight must have at least one row (V >= 1)")
    if chunk_size is None:
        chunk_size = default_chunk_size(V)
    elif isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    lead = student_hidden.shape[:-1]
    sh = student_hidden.reshape(-1, student_hidden.shape[-1])
    th = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
    lab = validate_labels(labels, sh.shape[0], V, ignore_index)
    divergence, beta = _canonical_divergence(divergence, beta)
    grad_on = torch.is_grad_enabled()
    need = [grad_on and sh.requires_grad, grad_on and student_weight.requires_grad,
            grad_on and student_bias is not None and student_bias.requires_grad]
    # Eager: choose now (a forced backend that cannot run fails here, early). Under
    # torch.compile the dispatcher's contextvar cannot be traced; "" makes the op body
    # choose at run time instead, with the same rules.
    backend = "" if torch.compiler.is_compiling() else backends.explain("kd_loss", sh, th).backend
    loss, _, _, _ = _fwd(sh, student_weight, student_bias, th, teacher_weight, teacher_bias, lab, temperature,
                         _DIV_CODE[divergence], beta, float(soft_weight), float(hard_weight), int(ignore_index),
                         _RED_CODE[reduction], bool(scale_by_t2), hard_weight != 0 and lab is not None,
                         int(chunk_size), need, backend)
    return loss.reshape(lead) if reduction == "none" else loss
