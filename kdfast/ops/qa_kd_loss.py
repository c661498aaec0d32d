"""Extractive-QA (SQuAD) distillation loss over start and end logits.

Built on the kd_loss per-row kernels: the start and end rows are stacked into
one ``[2B, L]`` problem so one fused forward/backward pass covers both heads.
"""
from __future__ import annotations

import torch

from kdfast import backends
from kdfast.ops import _checks
from kdfast.ops.kd_loss import _kd_fwd, _masked_log_softmax, kd_loss_reference

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


def qa_kd_loss_reference(student_start, student_end, teacher_start, teacher_end, start_positions=None,
                         end_positions=None, *, temperature=2.0, soft_weight=0.5, hard_weight=0.5,
                         attention_mask=None):
    """Readable reference (plain PyTorch autograd); the test oracle when given float64 inputs."""
    B, L = student_start.shape
    keep = None if attention_mask is None else attention_mask != 0
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


def qa_kd_loss(student_start, student_end, teacher_start, teacher_end, start_positions=None, end_positions=None,
               *, temperature=2.0, soft_weight=0.5, hard_weight=0.5, attention_mask=None):
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
        attention_mask: optional ``[B, L]``; 0 entries are set to -inf in both
            student and teacher, so they take no probability mass in either softmax.

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
                        attention_mask=attention_mask)
    T = _checks.positive("temperature", temperature)
    B, L = student_start.shape
    if L == 0:
        raise ValueError("student_start must have a non-empty sequence dimension (L >= 1)")
    keep = None
    if attention_mask is not None:
        _checks.tensor("attention_mask", attention_mask)
        if attention_mask.shape != student_start.shape:
            raise ValueError(f"attention_mask must have shape {tuple(student_start.shape)}, "
                             f"got {tuple(attention_mask.shape)}")
        keep = attention_mask != 0

    s = torch.cat([student_start, student_end], 0)
    t = torch.cat([teacher_start, teacher_end], 0)
    keep2 = None
    if keep is not None:
        keep2 = keep.repeat(2, 1)
        s = s.masked_fill(~keep2, float("-inf"))
        t = t.masked_fill(~keep2, float("-inf"))

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

    # Like kd_loss.kd_rows, but the backend is chosen inside the op under
    # torch.compile (the dispatcher's contextvar cannot be traced by dynamo).
    backend = "" if torch.compiler.is_compiling() else backends.explain("kd_loss", s, t).backend
    rows, _ = _kd_fwd(s, t, labels, T, 0, 0.5, -100, with_hard, backend)
    soft = rows[:, 0].reshape(2, B)
    loss = soft_weight * T * T * soft.sum(1) / max(B, 1)
    if with_hard:
        hard = torch.where(counted, rows[:, 1], torch.zeros_like(rows[:, 1])).reshape(2, B)
        n = counted.reshape(2, B).sum(1).clamp(min=1).to(hard.dtype)
        loss = loss + hard_weight * hard.sum(1) / n
    return loss.mean()
