"""Triton kernels of the fused logit distillation loss (kdfast.ops.kd_loss).

One program per row. The forward streams the row in blocks of BLOCK columns
with an online softmax for student and teacher at once: a running scalar max
per side and per-lane float32 accumulators, rescaled when the max grows, so
the row is read once (twice for JSD, whose terms need the normalised
probabilities). The backward reads the row once more and writes the student
gradient in the student's dtype. No [N, V] temporary besides that gradient;
no host synchronisation.

Conventions (kdfast/ops/kd_loss.py): a = s / T, b = t / T; div 0 = KL(p_t || p_s),
1 = KL(p_s || p_t), 2 = JSD with weight beta on p_t. Per-row stats (float32 [N, 4]):
lse(a), lse(b), lse(s) (lse(a) when the hard term is off), aux (reverse_kl:
E_ps[a - b]; jsd: KL(p_s || M); kl: 0). Ignored rows: rows 0, stats -inf,
gradient 0. NaN or +inf anywhere in a row gives NaN rows and stats.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

_MAX_BLOCK = 4096


@triton.jit
def _safe(m):
    # Centre of a side whose max is m: 0 for a fully masked side, so exp(x - c) stays 0, never NaN.
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def _kd_fwd_kernel(s_ptr, t_ptr, lab_ptr, rows_ptr, stats_ptr, V: tl.constexpr, stride_s, stride_t, inv_t, beta, log_beta,
                   log_1mbeta, ignore_index, DIV: tl.constexpr, HAS_LABELS: tl.constexpr, HARD: tl.constexpr,
                   NEED_LSE1: tl.constexpr, BLOCK: tl.constexpr):
    # V is a compile-time constant: one compile per vocabulary size, and the triton 3.6 interpreter
    # cannot loop to a runtime bound under numpy >= 2.4 (int() of a 1-element array).
    row = tl.program_id(0).to(tl.int64)
    ninf = float("-inf")
    label = tl.zeros([], tl.int64)
    ignored = False
    if HAS_LABELS:
        label = tl.load(lab_ptr + row)
        ignored = label == ignore_index
    if ignored:
        tl.store(rows_ptr + row * 2, 0.0)
        tl.store(rows_ptr + row * 2 + 1, 0.0)
        for k in tl.static_range(4):
            tl.store(stats_ptr + row * 4 + k, ninf)
    else:
        s_row = s_ptr + row * stride_s
        t_row = t_ptr + row * stride_t
        cols = tl.arange(0, BLOCK)
        # Running raw maxima of s and t; centres ca = safe(ms) / T, cb = safe(mt) / T, c1 = safe(ms).
        ms = tl.full([], ninf, tl.float32)
        mt = tl.full([], ninf, tl.float32)
        sum_a = tl.zeros([BLOCK], tl.float32)  # sum exp(a - ca)
        sum_b = tl.zeros([BLOCK], tl.float32)  # sum exp(b - cb)
        sum_1 = tl.zeros([BLOCK], tl.float32)  # sum exp(s - c1)
        dot = tl.zeros([BLOCK], tl.float32)  # kl: sum eb ((b-cb)-(a-ca)); reverse: sum ea ((a-ca)-(b-cb))
        bad = tl.zeros([BLOCK], tl.int32)
        for j0 in range(0, V, BLOCK):
            j = j0 + cols
            inb = j < V
            s = tl.load(s_row + j, mask=inb, other=ninf).to(tl.float32)
            t = tl.load(t_row + j, mask=inb, other=ninf).to(tl.float32)
            bad |= ((s != s) | (t != t) | (s == float("inf")) | (t == float("inf"))).to(tl.int32)
            ms_new = tl.maximum(ms, tl.max(tl.where(s == s, s, ninf), 0))
            mt_new = tl.maximum(mt, tl.max(tl.where(t == t, t, ninf), 0))
            ca_old = _safe(ms) * inv_t
            cb_old = _safe(mt) * inv_t
            ca = _safe(ms_new) * inv_t
            cb = _safe(mt_new) * inv_t
            # Rescale factors; a side with no finite value yet has all-zero sums (factor 1, never 0 * inf).
            ra = tl.exp(tl.where(ms == ninf, 0.0, ca_old - ca))
            rb = tl.exp(tl.where(mt == ninf, 0.0, cb_old - cb))
            xa = s * inv_t - ca
            xb = t * inv_t - cb
            ea = tl.exp(xa)
            eb = tl.exp(xb)
            if DIV == 0:
                dot = rb * (dot + sum_b * ((ca - ca_old) - (cb - cb_old)))
                dot += tl.where(eb > 0.0, eb * (xb - xa), 0.0)
            elif DIV == 1:
                dot = ra * (dot + sum_a * ((cb - cb_old) - (ca - ca_old)))
                dot += tl.where(ea > 0.0, ea * (xa - xb), 0.0)
            sum_a = sum_a * ra + ea
            sum_b = sum_b * rb + eb
            if NEED_LSE1:
                c1_old = _safe(ms)
                c1 = _safe(ms_new)
                sum_1 = sum_1 * tl.exp(tl.where(ms == ninf, 0.0, c1_old - c1)) + tl.exp(s - c1)
            ms = ms_new
            mt = mt_new
        ca = _safe(ms) * inv_t
        cb = _safe(mt) * inv_t
        sa = tl.sum(sum_a, 0)
        sb = tl.sum(sum_b, 0)
        dead_s = ms == ninf
        dead_t = mt == ninf
        lse_a = tl.where(dead_s, ninf, ca + tl.log(sa))
        lse_b = tl.where(dead_t, ninf, cb + tl.log(sb))
        lse_1 = lse_a
        if NEED_LSE1:
            lse_1 = tl.where(dead_s, ninf, _safe(ms) + tl.log(tl.sum(sum_1, 0)))
        soft = tl.zeros([], tl.float32)
        aux = tl.zeros([], tl.float32)
        if DIV == 0:
            # KL(t||s) = E_pt[(b-cb) - (a-ca)] + log(sa / sb): 0 for a dead teacher, inf for a dead student.
            e = tl.sum(dot, 0) / sb
            soft = tl.where(dead_t, 0.0, tl.where(dead_s, float("inf"), e + tl.log(sa / sb)))
        elif DIV == 1:
            e = tl.sum(dot, 0) / sa
            soft = tl.where(dead_s, 0.0, tl.where(dead_t, float("inf"), e + tl.log(sb / sa)))
            aux = tl.where(dead_s, 0.0, e + ca - cb)
        else:
            # JSD needs normalised probabilities: a second pass over the row.
            la = tl.where(dead_s, float("inf"), lse_a)
            lb = tl.where(dead_t, float("inf"), lse_b)
            kl_t = tl.zeros([BLOCK], tl.float32)
            kl_s = tl.zeros([BLOCK], tl.float32)
            for j0 in range(0, V, BLOCK):
                j = j0 + cols
                inb = j < V
                s = tl.load(s_row + j, mask=inb, other=ninf).to(tl.float32)
                t = tl.load(t_row + j, mask=inb, other=ninf).to(tl.float32)
                lps = s * inv_t - la
                lpt = t * inv_t - lb
                ps = tl.exp(lps)
                pt = tl.exp(lpt)
                xs = lps + log_1mbeta
                xt = lpt + log_beta
                hi = tl.maximum(xs, xt)
                lo = tl.minimum(xs, xt)
                lm = hi + tl.log(1.0 + tl.exp(lo - hi))
                kl_t += tl.where(pt > 0.0, pt * (lpt - lm), 0.0)
                kl_s += tl.where(ps > 0.0, ps * (lps - lm), 0.0)
            ks = tl.sum(kl_s, 0)
            both_dead = dead_s & dead_t
            soft = tl.where(both_dead, 0.0, beta * tl.sum(kl_t, 0) + (1.0 - beta) * ks)
            aux = tl.where(both_dead, 0.0, ks)
        hard = tl.zeros([], tl.float32)
        if HARD:
            ok = (label >= 0) & (label < V)
            s_lab = tl.load(s_row + label, mask=ok, other=0.0).to(tl.float32)
            # A fully masked student puts probability 0 on the label: -log 0 = inf.
            hard = tl.where(ok, tl.where(dead_s, float("inf"), lse_1 - s_lab), float("nan"))
        is_bad = tl.max(bad, 0) > 0
        nan = float("nan")
        tl.store(rows_ptr + row * 2, tl.where(is_bad, nan, soft))
        tl.store(rows_ptr + row * 2 + 1, tl.where(is_bad, nan, hard))
        tl.store(stats_ptr + row * 4, tl.where(is_bad, nan, lse_a))
        tl.store(stats_ptr + row * 4 + 1, tl.where(is_bad, nan, lse_b))
        tl.store(stats_ptr + row * 4 + 2, tl.where(is_bad, nan, lse_1))
        tl.store(stats_ptr + row * 4 + 3, tl.where(is_bad, nan, aux))


@triton.jit
def _kd_bwd_kernel(s_ptr, t_ptr, lab_ptr, stats_ptr, grow_ptr, g_ptr, V: tl.constexpr, stride_s, stride_t, inv_t, beta, log_beta,
                   log_1mbeta, ignore_index, DIV: tl.constexpr, HAS_LABELS: tl.constexpr, HARD: tl.constexpr,
                   BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    g_row = g_ptr + row * V
    label = tl.zeros([], tl.int64)
    ignored = False
    if HAS_LABELS:
        label = tl.load(lab_ptr + row)
        ignored = label == ignore_index
    if ignored:
        for j0 in range(0, V, BLOCK):
            j = j0 + cols
            tl.store(g_row + j, tl.zeros([BLOCK], tl.float32).to(g_ptr.dtype.element_ty), mask=j < V)
    else:
        s_row = s_ptr + row * stride_s
        t_row = t_ptr + row * stride_t
        inf = float("inf")
        la = tl.load(stats_ptr + row * 4)
        lb = tl.load(stats_ptr + row * 4 + 1)
        l1 = tl.load(stats_ptr + row * 4 + 2)
        aux = tl.load(stats_ptr + row * 4 + 3)
        la = tl.where(la == -inf, inf, la)
        lb = tl.where(lb == -inf, inf, lb)
        l1 = tl.where(l1 == -inf, inf, l1)
        gs = tl.load(grow_ptr + row * 2)
        gh = tl.load(grow_ptr + row * 2 + 1)
        cs = gs * inv_t
        for j0 in range(0, V, BLOCK):
            j = j0 + cols
            inb = j < V
            s = tl.load(s_row + j, mask=inb, other=0.0).to(tl.float32)
            a = s * inv_t
            ps = tl.exp(a - la)
            if DIV == 0:
                t = tl.load(t_row + j, mask=inb, other=0.0).to(tl.float32)
                g = cs * (ps - tl.exp(t * inv_t - lb))
            elif DIV == 1:
                t = tl.load(t_row + j, mask=inb, other=0.0).to(tl.float32)
                g = tl.where(ps > 0.0, cs * ps * ((a - t * inv_t) - aux), 0.0)
            else:
                t = tl.load(t_row + j, mask=inb, other=0.0).to(tl.float32)
                lps = a - la
                lpt = t * inv_t - lb
                xs = lps + log_1mbeta
                xt = lpt + log_beta
                hi = tl.maximum(xs, xt)
                lo = tl.minimum(xs, xt)
                lm = hi + tl.log(1.0 + tl.exp(lo - hi))
                g = tl.where(ps > 0.0, (cs * (1.0 - beta)) * ps * (lps - lm - aux), 0.0)
            # grad_rows[:, 0] == 0 must give an exact 0 (not 0 * inf) for rows with an infinite soft term.
            g = tl.where(gs == 0.0, 0.0, g)
            if HARD:
                g += tl.where(gh == 0.0, 0.0, gh * (tl.exp(s - l1) - tl.where(j == label, 1.0, 0.0)))
            tl.store(g_row + j, g.to(g_ptr.dtype.element_ty), mask=inb)


def _block(V: int, block: int | None) -> int:
    if block is not None:
        return int(block)
    return max(16, min(_MAX_BLOCK, triton.next_power_of_2(max(V, 1))))


def _warps(block: int) -> int:
    return 4 if block <= 1024 else 8 if block <= 2048 else 16


def _scalars(temperature, beta):
    log_beta = math.log(beta) if beta > 0 else float("-inf")
    log_1mbeta = math.log1p(-beta) if beta < 1 else float("-inf")
    return 1.0 / float(temperature), float(beta), log_beta, log_1mbeta


def _check(student, teacher, labels):
    if student.dim() != 2 or student.shape != teacher.shape:
        raise ValueError(f"kd_loss triton kernel: student and teacher must be equal 2-D [N, V] shapes, got "
                         f"{tuple(student.shape)} and {tuple(teacher.shape)}")
    if student.device != teacher.device:
        raise ValueError("kd_loss triton kernel: student and teacher must be on the same device")
    for name, x in (("student", student), ("teacher", teacher)):
        if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise TypeError(f"kd_loss triton kernel: {name} dtype must be float32/bfloat16/float16, got {x.dtype}")
        if x.shape[1] > 1 and x.stride(1) != 1:
            raise ValueError(f"kd_loss triton kernel: {name} needs unit stride along V")
    if labels is not None and (labels.dtype != torch.int64 or labels.shape != (student.shape[0],)):
        raise ValueError("kd_loss triton kernel: labels must be int64 [N]")


def kd_loss_fwd(student, teacher, labels, temperature, div, beta, ignore_index, compute_hard, *, block=None):
    """Per-row (soft, hard) float32 [N, 2] and stats float32 [N, 4]; see the module docstring.

    student, teacher: [N, V] float32/bfloat16/float16 (any mix), unit stride on V.
    labels: int64 [N] or None. ``block`` overrides the column block (tests).
    """
    _check(student, teacher, labels)
    N, V = student.shape
    rows = torch.empty((N, 2), dtype=torch.float32, device=student.device)
    stats = torch.empty((N, 4), dtype=torch.float32, device=student.device)
    if N == 0:
        return rows, stats
    inv_t, beta, log_beta, log_1mbeta = _scalars(temperature, beta)
    has_labels = labels is not None
    hard = bool(compute_hard) and has_labels
    B = _block(V, block)
    lab = labels.contiguous() if has_labels else rows  # dummy pointer when there are no labels
    _kd_fwd_kernel[(N,)](student, teacher, lab, rows, stats, V, student.stride(0), teacher.stride(0), inv_t, beta,
                         log_beta, log_1mbeta, int(ignore_index), DIV=int(div), HAS_LABELS=has_labels, HARD=hard,
                         NEED_LSE1=hard and inv_t != 1.0, BLOCK=B, num_warps=_warps(B))
    return rows, stats


def kd_loss_bwd(student, teacher, labels, stats, grad_rows, temperature, div, beta, ignore_index, compute_hard, *,
                block=None):
    """Student gradient [N, V] in the student's dtype from the forward's stats and grad_rows float32 [N, 2]."""
    _check(student, teacher, labels)
    N, V = student.shape
    grad = torch.empty((N, V), dtype=student.dtype, device=student.device)
    if N == 0 or V == 0:
        return grad
    stats = stats.float().contiguous()
    grad_rows = grad_rows.float().contiguous()
    inv_t, beta, log_beta, log_1mbeta = _scalars(temperature, beta)
    has_labels = labels is not None
    B = _block(V, block)
    lab = labels.contiguous() if has_labels else stats
    _kd_bwd_kernel[(N,)](student, teacher, lab, stats, grad_rows, grad, V, student.stride(0), teacher.stride(0),
                         inv_t, beta, log_beta, log_1mbeta, int(ignore_index), DIV=int(div), HAS_LABELS=has_labels,
                         HARD=bool(compute_hard) and has_labels, BLOCK=B, num_warps=_warps(B))
    return grad
