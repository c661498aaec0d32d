"""Logit distillation loss: KL, reverse KL and JSD between temperature-scaled
student and teacher distributions, plus an optional hard cross-entropy term.

Backends (dispatch names: forward "kd_loss", backward "kd_loss_bwd", forward writing the gradient
"kd_loss_fwd_grad"; ``kdfast.explain("kd_loss", student, teacher)`` says which forward runs):

    cpu:       csrc/cpu/kd_loss.cpp (fwd kd_loss_fwd, or kd_loss_fwd_grad writing the
               gradient with the loss; bwd kd_loss_bwd, or a scale of that gradient)
    triton:    kdfast/kernels/triton/kd_loss.py (fwd, bwd)
    cuda:      csrc/cuda/kd_loss.cu, glue csrc/cuda/kd_loss_torch.cpp (fwd, bwd); GPUs try triton first
    reference: this file (fwd, bwd)

Kernels work per row: a forward that returns per-row (soft, hard) terms and a
few per-row statistics, and a backward that streams the row once more to write
the student gradient. All weights, T^2 scaling and reductions happen here on
[N]-sized tensors, so every backend shares one meaning.
"""
from __future__ import annotations

import math

import torch

from kdfast import backends
from kdfast.ops import _checks

DIVERGENCES = ("kl", "reverse_kl", "jsd")
REDUCTIONS = ("batchmean", "sum", "mean", "none")
_DIV_CODE = {"kl": 0, "reverse_kl": 1, "jsd": 2}
# Per-row statistics kept for the backward pass (float32 [N, 4]):
#   0: logsumexp(student / T)   1: logsumexp(teacher / T)
#   2: logsumexp(student)       3: divergence-specific row term
#      (reverse_kl: sum p_s (a - b);  jsd: KL(p_s || M))
N_STATS = 4


# --------------------------------------------------------------------------
# Reference: the specification every backend is tested against.
# --------------------------------------------------------------------------
def _masked_log_softmax(x: torch.Tensor) -> torch.Tensor:
    """log_softmax over the last dim where a fully -inf row stays -inf (no NaN)."""
    dead = torch.isneginf(x).all(dim=-1, keepdim=True)
    # Feed dead rows zeros so that logsumexp's backward stays finite there too.
    lse = torch.logsumexp(torch.where(dead, torch.zeros_like(x), x), dim=-1, keepdim=True)
    return x - torch.where(dead, torch.zeros_like(lse), lse)


def _kl_rows(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """sum_j p_j (log p_j - log q_j) with 0 * log 0 = 0 (entries where p = 0 add nothing)."""
    live = logp > float("-inf")
    lp = torch.where(live, logp, torch.zeros_like(logp))
    lq = torch.where(live, logq, torch.zeros_like(logq))
    return torch.where(live, lp.exp() * (lp - lq), torch.zeros_like(lp)).sum(-1)


def _log_mixture(logp_t: torch.Tensor, logp_s: torch.Tensor, beta: float) -> torch.Tensor:
    """log(beta * p_t + (1 - beta) * p_s), -inf where both are 0 (with finite gradients)."""
    dead = torch.isneginf(logp_t) & torch.isneginf(logp_s)
    lt = torch.where(dead, torch.zeros_like(logp_t), logp_t)
    ls = torch.where(dead, torch.zeros_like(logp_s), logp_s)
    log_m = torch.logaddexp(lt + math.log(beta), ls + math.log1p(-beta))
    return torch.where(dead, torch.full_like(log_m, float("-inf")), log_m)


def kd_rows_reference(student, teacher, labels=None, *, temperature=1.0, divergence="kl",
                      beta=0.5, ignore_index=-100, compute_hard=True, compute_dtype=None):
    """Per-row (soft, hard) terms, shape [N, 2], in float32 (float64 for float64 inputs).

    Equivalent PyTorch for divergence="kl"::

        soft = F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1),
                        log_target=True, reduction="none").sum(-1)
        hard = F.cross_entropy(s, labels, reduction="none")

    JSD uses M = beta * p_t + (1 - beta) * p_s and
    soft = beta * KL(p_t || M) + (1 - beta) * KL(p_s || M); the public op maps
    beta = 0 to "kl" and beta = 1 to "reverse_kl" (the limits of the
    normalised skew divergence). Rows whose label is ignore_index give 0.
    ``compute_dtype`` (default float32, float64 for float64 inputs) is the
    dtype the math runs in.
    """
    acc = compute_dtype or (torch.float64 if student.dtype == torch.float64 else torch.float32)
    s, t = student.to(acc), teacher.to(acc)
    logp_s = _masked_log_softmax(s / temperature)
    logp_t = _masked_log_softmax(t / temperature)
    if divergence == "kl":
        soft = _kl_rows(logp_t, logp_s)
    elif divergence == "reverse_kl":
        soft = _kl_rows(logp_s, logp_t)
    else:
        log_m = _log_mixture(logp_t, logp_s, beta)
        soft = beta * _kl_rows(logp_t, log_m) + (1.0 - beta) * _kl_rows(logp_s, log_m)
    hard = torch.zeros_like(soft)
    if labels is not None:
        keep = labels != ignore_index
        if compute_hard:
            idx = torch.where(keep, labels, torch.zeros_like(labels)).unsqueeze(-1)
            nll = -_masked_log_softmax(s).gather(-1, idx).squeeze(-1)
            hard = torch.where(keep, nll, torch.zeros_like(nll))
        soft = torch.where(keep, soft, torch.zeros_like(soft))
    return torch.stack([soft, hard], dim=-1)


def kd_loss_reference(student_logits, teacher_logits, labels=None, *, temperature=1.0, divergence="kl", beta=0.5,
                      soft_weight=1.0, hard_weight=0.0, ignore_index=-100, reduction="batchmean", scale_by_t2=True):
    """Readable whole-loss reference (autograd through plain PyTorch); the test oracle in float64.

    Computes in float32 (float64 for float64 inputs); :func:`kd_loss_reference_in` takes the dtype.
    """
    return kd_loss_reference_in(None, student_logits, teacher_logits, labels, temperature=temperature,
                                divergence=divergence, beta=beta, soft_weight=soft_weight, hard_weight=hard_weight,
                                ignore_index=ignore_index, reduction=reduction, scale_by_t2=scale_by_t2)


def kd_loss_reference_in(compute_dtype, student_logits, teacher_logits, labels=None, *, temperature=1.0,
                         divergence="kl", beta=0.5, soft_weight=1.0, hard_weight=0.0, ignore_index=-100,
                         reduction="batchmean", scale_by_t2=True):
    """:func:`kd_loss_reference` computed in ``compute_dtype`` (None: its default); the tests' same-dtype
    PyTorch reference (e.g. all in bfloat16)."""
    V = student_logits.shape[-1]
    s = student_logits.reshape(-1, V)
    t = teacher_logits.reshape(-1, V)
    lab = None if labels is None else labels.reshape(-1)
    divergence, beta = _canonical_divergence(divergence, beta)
    rows = kd_rows_reference(s, t, lab, temperature=temperature, divergence=divergence, beta=beta,
                             ignore_index=ignore_index, compute_hard=hard_weight != 0, compute_dtype=compute_dtype)
    return _combine(rows, lab, V, temperature, soft_weight, hard_weight, ignore_index, reduction, scale_by_t2,
                    student_logits.shape[:-1])


def _canonical_divergence(divergence, beta):
    if divergence == "jsd" and beta == 0.0:
        return "kl", beta
    if divergence == "jsd" and beta == 1.0:
        return "reverse_kl", beta
    return divergence, beta


def _combine(rows, labels, V, T, soft_weight, hard_weight, ignore_index, reduction, scale_by_t2, lead_shape):
    soft_scale = soft_weight * (T * T if scale_by_t2 else 1.0)
    soft, hard = rows[:, 0], rows[:, 1]
    if reduction == "none":
        out = soft_scale * soft
        if hard_weight != 0:
            out = out + hard_weight * hard
        return out.reshape(lead_shape)
    if labels is None:
        count = torch.full((), rows.shape[0], dtype=rows.dtype, device=rows.device)
    else:
        count = (labels != ignore_index).sum().to(rows.dtype)
    # An empty or fully ignored batch gives 0 (not NaN), so a training step survives it.
    denom = count.clamp(min=1)
    soft_sum, hard_sum = soft.sum(), hard.sum()
    if reduction == "sum":
        out = soft_scale * soft_sum + hard_weight * hard_sum
    elif reduction == "batchmean":
        out = (soft_scale * soft_sum + hard_weight * hard_sum) / denom
    else:  # mean: KL averaged over elements like F.kl_div, CE over rows like F.cross_entropy
        out = soft_scale * soft_sum / (denom * V) + hard_weight * hard_sum / denom
    return out


# --------------------------------------------------------------------------
# Custom ops (schema, fake, autograd) and backend implementations.
# --------------------------------------------------------------------------
def _acc_dtype(x):
    """Rows and statistics are float32, or float64 for float64 inputs (reference backend only)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@torch.library.custom_op("kdfast::kd_loss_fwd", mutates_args=())
def _kd_fwd(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor | None,
            temperature: float, div: int, beta: float, ignore_index: int, compute_hard: bool,
            backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return backends.run("kd_loss", student, teacher, labels, temperature, div, beta, ignore_index,
                        compute_hard, backend=backend or None)


@_kd_fwd.register_fake
def _(student, teacher, labels, temperature, div, beta, ignore_index, compute_hard, backend):
    n, acc = student.shape[0], _acc_dtype(student)
    return student.new_empty((n, 2), dtype=acc), student.new_empty((n, N_STATS), dtype=acc)


@torch.library.custom_op("kdfast::kd_loss_bwd", mutates_args=())
def _kd_bwd(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor | None, stats: torch.Tensor,
            grad_rows: torch.Tensor, temperature: float, div: int, beta: float, ignore_index: int,
            compute_hard: bool, backend: str) -> torch.Tensor:
    return backends.run("kd_loss_bwd", student, teacher, labels, stats, grad_rows, temperature, div, beta,
                        ignore_index, compute_hard, backend=backend or None)


@_kd_bwd.register_fake
def _(student, teacher, labels, stats, grad_rows, temperature, div, beta, ignore_index, compute_hard, backend):
    return torch.empty_like(student, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    student, teacher, labels, temperature, div, beta, ignore_index, compute_hard, backend = inputs
    ctx.save_for_backward(student, teacher, labels, output[1])
    ctx.args = (temperature, div, beta, ignore_index, compute_hard, backend)


def _backward(ctx, grad_rows, grad_stats):
    student, teacher, labels, stats = ctx.saved_tensors
    grad = None
    if ctx.needs_input_grad[0]:
        grad = _kd_bwd(student, teacher, labels, stats, grad_rows.contiguous().to(stats.dtype), *ctx.args)
    # The teacher is a constant in distillation: it gets no gradient.
    return grad, None, None, None, None, None, None, None, None


_kd_fwd.register_autograd(_backward, setup_context=_setup_context)

_NAMES = {0: "kl", 1: "reverse_kl", 2: "jsd"}


@backends.register("kd_loss", "reference")
def _fwd_reference(student, teacher, labels, temperature, div, beta, ignore_index, compute_hard):
    rows = kd_rows_reference(student, teacher, labels, temperature=temperature, divergence=_NAMES[div],
                             beta=beta, ignore_index=ignore_index, compute_hard=compute_hard)
    acc = _acc_dtype(student)
    lse_a = torch.logsumexp(student.to(acc) / temperature, -1)
    lse_b = torch.logsumexp(teacher.to(acc) / temperature, -1)
    lse_s = torch.logsumexp(student.to(acc), -1)
    stats = torch.stack([lse_a, lse_b, lse_s, torch.zeros_like(lse_a)], -1)
    return rows, stats


@backends.register("kd_loss_bwd", "reference")
def _bwd_reference(student, teacher, labels, stats, grad_rows, temperature, div, beta, ignore_index,
                   compute_hard):
    """d(rows)/d(student) written out (autograd does not run inside an op body).

    With a = s / T, b = t / T, p_s = softmax(a), p_t = softmax(b):
      kl:          (p_s - p_t) / T
      reverse_kl:  p_s * ((a - b) - sum(p_s * (a - b))) / T
      jsd:         (1 - beta) * p_s * (log p_s - log M - KL(p_s || M)) / T
      hard:        softmax(s) - onehot(label)
    """
    T = temperature
    acc = _acc_dtype(student)
    s, t = student.to(acc), teacher.to(acc)
    logp_s = _masked_log_softmax(s / T)
    logp_t = _masked_log_softmax(t / T)
    p_s = logp_s.exp()
    live = p_s > 0
    zero = torch.zeros_like(p_s)
    if div == 0:
        g = p_s - logp_t.exp()
    elif div == 1:
        d = torch.where(live, (s - t) / T, zero)
        g = torch.where(live, p_s * (d - (p_s * d).sum(-1, keepdim=True)), zero)
    else:
        log_m = _log_mixture(logp_t, logp_s, beta)
        d = torch.where(live, logp_s - log_m, zero)
        g = (1.0 - beta) * torch.where(live, p_s * (d - (p_s * d).sum(-1, keepdim=True)), zero)
    grad = grad_rows[:, :1] * g / T
    if labels is not None:
        keep = (labels != ignore_index).unsqueeze(-1)
        if compute_hard:
            idx = torch.where(keep.squeeze(-1), labels, torch.zeros_like(labels)).unsqueeze(-1)
            h = _masked_log_softmax(s).exp().scatter_add(-1, idx, -torch.ones_like(idx, dtype=s.dtype))
            grad = grad + grad_rows[:, 1:] * h
        grad = torch.where(keep, grad, torch.zeros_like(grad))
    return grad.to(student.dtype)


# What the cpu, cuda and triton kernels take (kdfast.backends checks it; explain() reports it).
KERNEL_LIMITS = backends.Limits(dtypes=backends.kernel_dtypes("student", "teacher"))


@backends.register("kd_loss", "cpu", limits=KERNEL_LIMITS, kernel="kd_loss_fwd")
def _fwd_cpu(student, teacher, labels, temperature, div, beta, ignore_index, compute_hard):
    return torch.ops.kdfast_C.kd_loss_fwd(student, teacher, labels, temperature, div, beta, ignore_index,
                                          compute_hard)


@backends.register("kd_loss_bwd", "cpu", limits=KERNEL_LIMITS, kernel="kd_loss_bwd")
def _bwd_cpu(student, teacher, labels, stats, grad_rows, temperature, div, beta, ignore_index, compute_hard):
    return torch.ops.kdfast_C.kd_loss_bwd(student, teacher, labels, stats, grad_rows, temperature, div, beta,
                                          ignore_index, compute_hard)


@backends.register("kd_loss", "cuda", limits=KERNEL_LIMITS, kernel="kd_loss_fwd_cuda")
def _fwd_cuda(student, teacher, labels, temperature, div, beta, ignore_index, compute_hard):
    return torch.ops.kdfast_C.kd_loss_fwd_cuda(student, teacher, labels, temperature, div, beta, ignore_index,
                                               compute_hard)


@backends.register("kd_loss_bwd", "cuda", limits=KERNEL_LIMITS, kernel="kd_loss_bwd_cuda")
def _bwd_cuda(student, teacher, labels, stats, grad_rows, temperature, div, beta, ignore_index, compute_hard):
    return torch.ops.kdfast_C.kd_loss_bwd_cuda(student, teacher, labels, stats, grad_rows, temperature, div,
                                               beta, ignore_index, compute_hard)


@backends.register("kd_loss", "triton", limits=KERNEL_LIMITS)
def _fwd_triton(*args):
    from kdfast.kernels.triton import kd_loss as k
    return k.kd_loss_fwd(*args)


@backends.register("kd_loss_bwd", "triton", limits=KERNEL_LIMITS)
def _bwd_triton(*args):
    from kdfast.kernels.triton import kd_loss as k
    return k.kd_loss_bwd(*args)


# Loss rows and the student gradient at given row weights in one visit of each row: what the fused CPU
# autograd paths of kd_loss, qa_kd_loss and fused_linear_kd_loss call (reference: forward, then backward).
@backends.register("kd_loss_fwd_grad", "reference")
def _fwd_grad_reference(student, teacher, labels, temperature, div, beta, ignore_index, compute_hard, soft_grad,
                        hard_grad, row_weights=None):
    rows, stats = _fwd_reference(student, teacher, labels, temperature, div, beta, ignore_index, compute_hard)
    if row_weights is None:
        row_weights = torch.tensor([soft_grad, hard_grad], dtype=torch.float32).expand(student.shape[0], 2)
    grad = _bwd_reference(student, teacher, labels, stats, row_weights.float().contiguous(), temperature, div,
                          beta, ignore_index, compute_hard)
    return rows, stats, grad


@backends.register("kd_loss_fwd_grad", "cpu", limits=KERNEL_LIMITS, kernel="kd_loss_fwd_grad")
def _fwd_grad_cpu(student, teacher, labels, temperature, div, beta, ignore_index, compute_hard, soft_grad,
                  hard_grad, row_weights=None):
    return torch.ops.kdfast_C.kd_loss_fwd_grad(student, teacher, labels, temperature, div, beta, ignore_index,
                                               compute_hard, soft_grad, hard_grad, row_weights)


backends.set_gpu_order("kd_loss", ("triton", "cuda"))
backends.set_gpu_order("kd_loss_bwd", ("triton", "cuda"))


# --------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------
def _rows_2d(x):
    # Kernels need unit stride along V; any row stride is fine.
    return x if x.stride(-1) == 1 else x.contiguous()


class _KDRowsEager(torch.autograd.Function):
    """Eager twin of the kdfast::kd_loss_fwd custom op: the same backend calls and
    backward, without the custom-op dispatch layers (~100 us per call, which is
    most of the cost at QA shapes like [64, 384])."""

    @staticmethod
    def forward(ctx, student, teacher, labels, *args):
        rows, stats = backends.run("kd_loss", student, teacher, labels, *args[:-1], backend=args[-1])
        ctx.save_for_backward(student, teacher, labels, stats)
        ctx.args = args
        return rows

    @staticmethod
    def backward(ctx, grad_rows):
        student, teacher, labels, stats = ctx.saved_tensors
        grad = None
        if ctx.needs_input_grad[0]:
            grad = backends.run("kd_loss_bwd", student, teacher, labels, stats, grad_rows.contiguous().to(stats.dtype),
                                *ctx.args[:-1], backend=ctx.args[-1])
        return (grad,) + (None,) * (2 + len(ctx.args))


def _row_grad_weights(reduction, soft_scale, hard_weight, count, V):
    """d loss / d (soft_i, hard_i) at grad_output = 1: the same for every counted row."""
    denom = max(count, 1)
    if reduction in ("none", "sum"):
        return soft_scale, hard_weight
    if reduction == "batchmean":
        return soft_scale / denom, hard_weight / denom
    return soft_scale / (denom * V), hard_weight / denom  # mean


class _KDLossFusedCPU(torch.autograd.Function):
    """kd_loss with the student gradient computed in the forward (CPU kernel).

    The kernel visits each row once for the loss and its gradient at
    grad_output = 1 (the row stays in cache; KL and reverse KL reuse the
    forward's exponentials), so the backward only scales it: nothing when
    grad_output is 1 (``loss.backward()``), one multiply otherwise. Peak memory
    is unchanged: the one logits-sized gradient buffer, held from the forward.
    A second backward through the same graph (retain_graph) recomputes the
    gradient with the backward kernel.
    """

    @staticmethod
    def forward(ctx, student, teacher, labels, temperature, div, beta, ignore_index, compute_hard,
                soft_weight, hard_weight, reduction, scale_by_t2, lead_shape):
        V = student.shape[1]
        count = student.shape[0] if labels is None else int((labels != ignore_index).sum())
        soft_scale = soft_weight * (temperature * temperature if scale_by_t2 else 1.0)
        weights = _row_grad_weights(reduction, soft_scale, hard_weight if compute_hard else 0.0, count, V)
        rows, stats, grad = backends.run("kd_loss_fwd_grad", student, teacher, labels, temperature, div, beta,
                                         ignore_index, compute_hard, *weights, backend="cpu")
        ctx.save_for_backward(student, teacher, labels, stats)
        ctx.grad, ctx.weights, ctx.reduction = grad, weights, reduction
        ctx.args = (temperature, div, beta, ignore_index, compute_hard)
        # Every reduction is a weighted sum of the rows with these weights (what _combine computes).
        per_row = torch.mv(rows, torch.tensor(weights, dtype=rows.dtype))
        return per_row.reshape(lead_shape) if reduction == "none" else per_row.sum()

    @staticmethod
    def backward(ctx, grad_out):
        grad, ctx.grad = ctx.grad, None  # drop our reference so autograd can take the buffer over
        none = (None,) * 12
        if not ctx.needs_input_grad[0]:
            return (None,) + none
        per_row = ctx.reduction == "none"
        scale = grad_out.reshape(-1, 1).float() if per_row else float(grad_out)
        if grad is not None:
            if not per_row and scale == 1.0:
                return (grad,) + none
            if grad.dtype == torch.float32:  # low-precision gradients are recomputed: one rounding, not two
                return (grad.mul_(scale),) + none
        student, teacher, labels, stats = ctx.saved_tensors
        w = torch.tensor(ctx.weights, dtype=torch.float32)
        grad_rows = (scale * w).expand(student.shape[0], 2).contiguous()
        grad = backends.run("kd_loss_bwd", student, teacher, labels, stats, grad_rows, *ctx.args, backend="cpu")
        return (grad,) + none


def _fused_cpu_ok(s, t):
    return (torch.is_grad_enabled() and s.requires_grad and not torch.compiler.is_compiling()
            and backends.choose("kd_loss", s, t) == "cpu" and backends.choose("kd_loss_fwd_grad", s, t) == "cpu")


def kd_rows(student, teacher, labels, *, temperature, divergence, beta, ignore_index, compute_hard):
    """Per-row (soft, hard) terms [N, 2] float32 through the fastest backend, with autograd."""
    args = (float(temperature), _DIV_CODE[divergence], float(beta), int(ignore_index), bool(compute_hard))
    s, t = _rows_2d(student), _rows_2d(teacher)
    if torch.compiler.is_compiling():
        # The op body chooses at run time (same rules, opaque to the tracer).
        return _kd_fwd(s, t, labels, *args, "")[0]
    # Eager: choose once so forward and backward surely use one backend.
    return _KDRowsEager.apply(s, t, labels, *args, backends.choose("kd_loss", s, t))


def validate_labels(labels, n, V, ignore_index, name="labels"):
    if labels is None:
        return None
    _checks.tensor(name, labels, dtypes=(torch.int64, torch.int32))
    if labels.numel() != n:
        raise ValueError(f"{name} must have one entry per row ({n}), got shape {tuple(labels.shape)}")
    labels = labels.reshape(-1).long()
    # Range check costs a host sync, so only for CPU tensors in eager mode.
    if labels.device.type == "cpu" and n > 0 and not torch.compiler.is_compiling():
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= V))
        if bool(bad.any()):
            raise ValueError(f"{name} must be in [0, {V}) or ignore_index={ignore_index}, "
                             f"got {labels[bad][0].item()}")
    return labels


def kd_loss(student_logits, teacher_logits, labels=None, *, temperature=1.0, divergence="kl", beta=0.5,
            soft_weight=1.0, hard_weight=0.0, ignore_index=-100, reduction="batchmean", scale_by_t2=True):
    """Fused knowledge-distillation loss.

    Args:
        student_logits: ``[..., V]`` float32/bfloat16/float16 (gets the gradient).
        teacher_logits: ``[..., V]``, same shape; logits or log-probabilities
            (``log_softmax(x / T)`` of log-probabilities equals that of the
            logits, so cached teachers can pass either). Gets no gradient.
        labels: optional ``[...]`` int64; rows equal to ``ignore_index`` count
            for nothing in either term.
        temperature: T applied to both sides of the soft term.
        divergence: ``"kl"`` = KL(teacher || student) (Hinton, DistilBERT),
            ``"reverse_kl"`` = KL(student || teacher), ``"jsd"`` =
            beta * KL(p_t || M) + (1 - beta) * KL(p_s || M) with
            M = beta * p_t + (1 - beta) * p_s; ``beta=0`` gives exactly "kl" and
            ``beta=1`` exactly "reverse_kl" (limits of the normalised skew JSD).
        soft_weight, hard_weight: total = soft_weight * soft + hard_weight * CE(student at T=1, labels).
        reduction: ``"batchmean"`` (sum / counted rows), ``"sum"``, ``"mean"``
            (soft term over counted rows * V like ``F.kl_div``, hard term over
            counted rows like ``F.cross_entropy``), ``"none"`` (per row, shape ``[...]``).
            A batch with no counted row gives 0, not NaN.
        scale_by_t2: multiply the soft term by T^2 (DistilBERT; TinyBERT uses no T^2).

    ``-inf`` logits (masked positions) are exact: they add nothing, never NaN;
    a row fully masked in both models contributes 0. Returns float32 (float64 for float64 inputs, which run on the reference backend).

    Equivalent PyTorch (divergence="kl", reduction="batchmean")::

        T * T * F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1),
                         log_target=True, reduction="batchmean")
    """
    _checks.tensor("student_logits", student_logits, dtypes=_checks.FLOAT_DTYPES, min_ndim=1)
    _checks.tensor("teacher_logits", teacher_logits, dtypes=_checks.FLOAT_DTYPES, min_ndim=1)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student_logits and teacher_logits must have the same shape, got "
                         f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}")
    _checks.same_device(student_logits=student_logits, teacher_logits=teacher_logits, labels=labels)
    temperature = _checks.positive("temperature", temperature)
    _checks.choice("divergence", divergence, DIVERGENCES)
    _checks.choice("reduction", reduction, REDUCTIONS)
    beta = _checks.in_unit("beta", beta)
    V = student_logits.shape[-1]
    if V == 0:
        raise ValueError("student_logits must have a non-empty last dimension (V >= 1)")
    s = student_logits.reshape(-1, V)
    t = teacher_logits.reshape(-1, V)
    lab = validate_labels(labels, s.shape[0], V, ignore_index)
    divergence, beta = _canonical_divergence(divergence, beta)
    compute_hard = hard_weight != 0 and lab is not None
    if _fused_cpu_ok(s, t):
        return _KDLossFusedCPU.apply(_rows_2d(s), _rows_2d(t), lab, float(temperature), _DIV_CODE[divergence],
                                     float(beta), int(ignore_index), compute_hard, float(soft_weight),
                                     float(hard_weight), reduction, scale_by_t2, student_logits.shape[:-1])
    rows = kd_rows(s, t, lab, temperature=temperature, divergence=divergence, beta=beta,
                   ignore_index=ignore_index, compute_hard=hard_weight != 0 and lab is not None)
    return _combine(rows, lab, V, temperature, soft_weight, hard_weight, ignore_index, reduction, scale_by_t2,
                    student_logits.shape[:-1])
