"""Extractive-QA (SQuAD) distillation loss over start and end logits.

Backends: the kd_loss kernels on the stacked rows (dispatch name "kd_loss"):

    cpu:       csrc/cpu/kd_loss.cpp (fwd + gradient in one pass, kd_loss_fwd_grad; bwd scales it)
    triton:    kdfast/kernels/triton/kd_loss.py (fwd, bwd)
    cuda:      csrc/cuda/kd_loss.cu (fwd, bwd)
    reference: this file (qa_kd_loss_reference; the rows' math is kd_loss's reference)

Built on the kd_loss per-row kernels: the start and end rows are stacked into
one ``[2B, L]`` problem so one fused forward/backward pass covers both heads.
"""
from __future__ import annotations

import torch

from kdfast import backends
from kdfast.ops import _checks
from kdfast.ops.kd_loss import _masked_log_softmax, kd_loss_reference, kd_rows
from kdfast.ops.renamed_arguments import renamed_keywords

_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def _positions(name, pos, B):
    _checks.tensor(name, pos, dtypes=_INT_DTYPES)
    if pos.numel() != B or pos.dim() > 2 or (pos.dim() == 2 and pos.shape[1] != 1):
        raise ValueError(f"{name} must have shape [B] or [B, 1] with B={B}, got {tuple(pos.shape)}")
    return pos.reshape(-1).long()


def _counted(pos, L, keep):
    """HF rule (BertForQuestionAnswering): clamp to [0, L], then L is ignore_index.

    Positions on masked tokens (attention_mask == 0) are ignored too: their
    cross-entropy would be infinite once those logits are -inf.
    Returns (clamped positions, counted mask).
    """
    pos = pos.clamp(0, L)
    counted = pos != L
    if keep is not None:
        at = keep.gather(1, pos.clamp(max=max(L - 1, 0)).unsqueeze(1)).squeeze(1)
        counted = counted & at
    return pos, counted


@renamed_keywords(attention_mask="mask")
def qa_kd_loss_reference(student_start, student_end, teacher_start, teacher_end, start_positions=None,
                         end_positions=None, mask=None, *, temperature=2.0, soft_weight=0.5, hard_weight=0.5):
    """Readable reference (plain PyTorch autograd); the test oracle when given float64 inputs."""
    B, L = student_start.shape
    keep = None if mask is None else mask != 0
    T = temperature

    def term(s, t, pos):
        if keep is not None:
            s = s.masked_fill(~keep, float("-inf"))
            t = t.masked_fill(~keep, float("-inf"))
        loss = soft_weight * kd_loss_reference(s, t, temperature=T, reduction="batchmean", scale_by_t2=True)
        if pos is not None and hard_weight != 0:
            pos, counted = _counted(pos.reshape(-1).long(), L, keep)
            logp = _masked_log_softmax(s.to(loss.dtype))
            nll = -logp.gather(1, torch.where(counted, pos, 0).unsqueeze(1)).squeeze(1)
            nll = torch.where(counted, nll, torch.zeros_like(nll))
            loss = loss + hard_weight * nll.sum() / counted.sum().clamp(min=1)
        return loss

    return 0.5 * (term(student_start, teacher_start, start_positions) + term(student_end, teacher_end, end_positions))


def _stack(start, end, keep2):
    """[2B, L] rows of start then end logits, masked tokens set to -inf."""
    x = torch.cat([start, end], 0)
    return x if keep2 is None else x.masked_fill(~keep2, float("-inf"))


class _QAKDFusedCPU(torch.autograd.Function):
    """qa_kd_loss on the CPU kernel that computes the gradient in the forward
    (see kd_loss._KDLossFusedCPU): the start and end rows are one [2B, L]
    problem with a (soft, hard) weight pair per row; the backward scales the
    gradient and hands back its two halves (the -inf fill and the stacking
    happen inside, so autograd records one node)."""

    @staticmethod
    def forward(ctx, student_start, student_end, teacher_start, teacher_end, keep2, labels, weights, T,
                with_hard):
        s = _stack(student_start, student_end, keep2)
        t = _stack(teacher_start, teacher_end, keep2)
        rows, stats, grad = backends.run("kd_loss_fwd_grad", s, t, labels, T, 0, 0.5, -100, with_hard, 0.0, 0.0,
                                         weights, backend="cpu")
        ctx.save_for_backward(s, t, labels, stats, weights)
        ctx.grad, ctx.T, ctx.with_hard, ctx.B = grad, T, with_hard, student_start.shape[0]
        return (rows * weights).sum()

    @staticmethod
    def backward(ctx, grad_out):
        grad, ctx.grad = ctx.grad, None  # drop our reference: autograd may take the buffer over
        c = float(grad_out)
        if grad is None or (c != 1.0 and grad.dtype != torch.float32):
            s, t, labels, stats, weights = ctx.saved_tensors  # recompute: one rounding for low precision
            grad = backends.run("kd_loss_bwd", s, t, labels, stats, (weights * c).contiguous(), ctx.T, 0, 0.5,
                                -100, ctx.with_hard, backend="cpu")
        elif c != 1.0:
            grad.mul_(c)
        B = ctx.B
        return (grad[:B], grad[B:]) + (None,) * 7


def _row_weights(B, T, soft_weight, hard_weight, counted, with_hard):
    """d loss / d (soft, hard) of each of the 2B rows (start rows, then end rows)."""
    w = torch.zeros(2 * B, 2, dtype=torch.float32, device=counted.device if counted is not None else "cpu")
    w[:, 0] = 0.5 * soft_weight * T * T / max(B, 1)
    if with_hard:
        c = counted.reshape(2, B).to(torch.float32)
        w[:, 1] = (0.5 * hard_weight * c / c.sum(1, keepdim=True).clamp(min=1)).reshape(-1)
    return w


@renamed_keywords(attention_mask="mask")
def qa_kd_loss(student_start, student_end, teacher_start, teacher_end, start_positions=None, end_positions=None,
               mask=None, *, temperature=2.0, soft_weight=0.5, hard_weight=0.5):
    """SQuAD-style distillation loss: mean of the start term and the end term.

    Each term = ``soft_weight * T^2 * KL(p_teacher || p_student)`` (batchmean over
    the B sequences, both softmaxes at temperature T) ``+ hard_weight *
    CE(student, positions)`` (mean over counted sequences, at T=1).

    Args:
        student_start, student_end: ``[B, L]`` float32/bfloat16/float16/float64 (get gradients).
        teacher_start, teacher_end: ``[B, L]`` (no gradient).
        start_positions, end_positions: optional ``[B]`` or ``[B, 1]`` integer
            gold positions, both or neither. As in HF ``BertForQuestionAnswering``,
            positions are clamped to ``[0, L]`` and ``L`` is ignored (so
            positions ``>= L`` are ignored and negative ones become 0).
            Positions on masked tokens are ignored as well. A head with no
            counted position contributes 0 hard loss (HF gives NaN there).
        mask: optional ``[B, L]`` bool/integer/float, nonzero = keep (the HF ``attention_mask``,
            or a span mask); masked entries are set to -inf in both student and teacher, so they
            take no probability mass in either softmax. (``attention_mask=``: the old name,
            deprecated.)

    Returns a float32 scalar (the kd kernels' per-row terms are float32).

    Equivalent PyTorch (no mask)::

        def term(s, t, pos):
            kl = F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1),
                          log_target=True, reduction="batchmean")
            ce = F.cross_entropy(s, pos.clamp(0, L), ignore_index=L)
            return soft_weight * T * T * kl + hard_weight * ce
        loss = (term(ss, ts, start_positions) + term(se, te, end_positions)) / 2
    """
    names = ("student_start", "student_end", "teacher_start", "teacher_end")
    xs = (student_start, student_end, teacher_start, teacher_end)
    for n, x in zip(names, xs):
        _checks.tensor(n, x, dtypes=_checks.FLOAT_DTYPES, ndim=2)
    for n, x in zip(names[1:], xs[1:]):
        if x.shape != student_start.shape:
            raise ValueError(f"{n} must have the shape of student_start {tuple(student_start.shape)}, "
                             f"got {tuple(x.shape)}")
    if (start_positions is None) != (end_positions is None):
        raise ValueError("start_positions and end_positions must be given together (or neither)")
    _checks.same_device(student_start=student_start, student_end=student_end, teacher_start=teacher_start,
                        teacher_end=teacher_end, start_positions=start_positions, end_positions=end_positions,
                        mask=mask)
    T = _checks.positive("temperature", temperature)
    B, L = student_start.shape
    if L == 0:
        raise ValueError("student_start must have a non-empty sequence dimension (L >= 1)")
    keep = None
    if mask is not None:
        _checks.tensor("mask", mask)
        if mask.shape != student_start.shape:
            raise ValueError(f"mask must have shape {tuple(student_start.shape)} (nonzero = keep), "
                             f"got {tuple(mask.shape)}")
        keep = mask != 0

    keep2 = None if keep is None else keep.repeat(2, 1)

    labels = counted = None
    with_hard = start_positions is not None and hard_weight != 0
    if with_hard:
        pos = torch.cat([_positions("start_positions", start_positions, B),
                         _positions("end_positions", end_positions, B)])
        pos, counted = _counted(pos, L, keep2)
        # kd_rows drops both terms of a row labelled ignore_index, but an ignored
        # position must keep its soft term: give it a finite stand-in label
        # (the first kept token) and drop its hard term below instead. Fully
        # masked rows contribute nothing at all, so they can use ignore_index.
        if keep2 is None:
            stand_in = torch.zeros_like(pos)
        else:
            dead = ~keep2.any(1)
            stand_in = torch.where(dead, -100, keep2.to(torch.uint8).argmax(1))
        labels = torch.where(counted, pos, stand_in)

    if (torch.is_grad_enabled() and (student_start.requires_grad or student_end.requires_grad)
            and student_start.dtype == student_end.dtype and not torch.compiler.is_compiling()
            and backends.choose("kd_loss", student_start, teacher_start) == "cpu"
            and backends.choose("kd_loss_fwd_grad", student_start, teacher_start) == "cpu"):
        weights = _row_weights(B, T, soft_weight, hard_weight, counted, with_hard)
        return _QAKDFusedCPU.apply(student_start, student_end, teacher_start, teacher_end, keep2, labels, weights,
                                   T, with_hard)
    s = _stack(student_start, student_end, keep2)
    t = _stack(teacher_start, teacher_end, keep2)
    # Eager: one backend for forward and backward without the custom-op dispatch
    # layers; under torch.compile the op chooses at run time.
    rows = kd_rows(s, t, labels, temperature=T, divergence="kl", beta=0.5, ignore_index=-100,
                   compute_hard=with_hard)
    soft = rows[:, 0].reshape(2, B)
    loss = soft_weight * T * T * soft.sum(1) / max(B, 1)
    if with_hard:
        hard = torch.where(counted, rows[:, 1], torch.zeros_like(rows[:, 1])).reshape(2, B)
        n = counted.reshape(2, B).sum(1).clamp(min=1).to(hard.dtype)
        loss = loss + hard_weight * hard.sum(1) / n
    return loss.mean()
