"""Triton kernels of attention_kl (MiniLM attention KL) without L x L maps.

Flash-style. One program per (query block, batch*head) streams key blocks
once, keeping for each row the running maxima and denominators of both
softmaxes and E_{p_t}[S_t - S_s] rescaled like the teacher's denominator (so
the KL needs one pass). Gradients of the summed loss take two more streaming
kernels (dq over key blocks, dk over query blocks) using the saved per-row
log-sum-exps, so nothing of size L x L is stored.

Numerics and launch rules: kdfast/kernels/triton/attention_map_buffers.py.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kdfast.kernels.triton.attention_map_buffers import block, grad_buffers

# Start of the running maxima: finite, so exp(m_old - m_new) never sees -inf - -inf on fully padded
# key blocks (a constexpr: compiled Triton refuses plain Python globals).
_MINF = tl.constexpr(-1.0e30)


def _bhld(x):
    """[B, H, L, D] -> strides as a flat (bh, l, d) view; keeps non-contiguous inputs as they are."""
    return x.stride(0), x.stride(1), x.stride(2), x.stride(3)


@triton.jit
def _load_rows(ptr, b, h, rows, L, D, s0, s1, s2, s3, BLOCK_D: tl.constexpr):
    d = tl.arange(0, BLOCK_D)
    p = ptr + b * s0 + h * s1 + rows[:, None] * s2 + d[None, :] * s3
    return tl.load(p, mask=(rows[:, None] < L) & (d[None, :] < D), other=0.0).to(tl.float32)


@triton.jit
def _kl_fwd_kernel(QS, KS, QT, KT, MASK, ROWS, LSE, H, L: tl.constexpr, DS, DT, scale_s, scale_t,
                   qs0, qs1, qs2, qs3, ks0, ks1, ks2, ks3, qt0, qt1, qt2, qt3, kt0, kt1, kt2, kt3,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DS: tl.constexpr, BLOCK_DT: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)  # int64: b * stride_b and bh * L * E can pass 2^31
    b = bh // H
    h = bh % H
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    qs = _load_rows(QS, b, h, rows, L, DS, qs0, qs1, qs2, qs3, BLOCK_DS) * scale_s
    qt = _load_rows(QT, b, h, rows, L, DT, qt0, qt1, qt2, qt3, BLOCK_DT) * scale_t
    m_s = tl.full([BLOCK_M], _MINF, tl.float32)
    m_t = tl.full([BLOCK_M], _MINF, tl.float32)
    z_s = tl.zeros([BLOCK_M], tl.float32)
    z_t = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M], tl.float32)
    for n0 in range(0, L, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        keep = (cols < L) & (tl.load(MASK + b * L + cols, mask=cols < L, other=0.0) != 0)
        ks = _load_rows(KS, b, h, cols, L, DS, ks0, ks1, ks2, ks3, BLOCK_DS)
        kt = _load_rows(KT, b, h, cols, L, DT, kt0, kt1, kt2, kt3, BLOCK_DT)
        s = tl.dot(qs, tl.trans(ks), input_precision="ieee")
        t = tl.dot(qt, tl.trans(kt), input_precision="ieee")
        s = tl.where(keep[None, :], s, float("-inf"))
        t = tl.where(keep[None, :], t, float("-inf"))
        ms_new = tl.maximum(m_s, tl.max(s, 1))
        mt_new = tl.maximum(m_t, tl.max(t, 1))
        es = tl.exp(s - ms_new[:, None])
        et = tl.exp(t - mt_new[:, None])
        alpha_s = tl.exp(m_s - ms_new)
        alpha_t = tl.exp(m_t - mt_new)
        z_s = z_s * alpha_s + tl.sum(es, 1)
        z_t = z_t * alpha_t + tl.sum(et, 1)
        acc = acc * alpha_t + tl.sum(tl.where(keep[None, :], et * (t - s), 0.0), 1)
        m_s = ms_new
        m_t = mt_new
    lse_s = m_s + tl.log(z_s)
    lse_t = m_t + tl.log(z_t)
    row_keep = (rows < L) & (tl.load(MASK + b * L + rows, mask=rows < L, other=0.0) != 0)
    kl = tl.where(row_keep, acc / z_t - lse_t + lse_s, 0.0)
    out = bh * L + rows
    tl.store(ROWS + out, kl, mask=rows < L)
    tl.store(LSE + out * 2, lse_s, mask=rows < L)
    tl.store(LSE + out * 2 + 1, lse_t, mask=rows < L)


@triton.jit
def _kl_probs_diff(qs, qt, ks, kt, lse_s, lse_t, keep_rows, keep_cols):
    """p_s - p_t on a (rows x cols) tile, 0 outside valid pairs."""
    s = tl.dot(qs, tl.trans(ks), input_precision="ieee")
    t = tl.dot(qt, tl.trans(kt), input_precision="ieee")
    ok = keep_rows[:, None] & keep_cols[None, :]
    ps = tl.exp(tl.where(ok, s - lse_s[:, None], float("-inf")))
    pt = tl.exp(tl.where(ok, t - lse_t[:, None], float("-inf")))
    return ps - pt


@triton.jit
def _kl_dq_kernel(QS, KS, QT, KT, MASK, LSE, DQ, W, H, L: tl.constexpr, DS, DT, scale_s, scale_t,
                  qs0, qs1, qs2, qs3, ks0, ks1, ks2, ks3, qt0, qt1, qt2, qt3, kt0, kt1, kt2, kt3,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DS: tl.constexpr, BLOCK_DT: tl.constexpr,
                  HAS_W: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)  # int64: b * stride_b and bh * L * E can pass 2^31
    b = bh // H
    h = bh % H
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    qs = _load_rows(QS, b, h, rows, L, DS, qs0, qs1, qs2, qs3, BLOCK_DS) * scale_s
    qt = _load_rows(QT, b, h, rows, L, DT, qt0, qt1, qt2, qt3, BLOCK_DT) * scale_t
    row_keep = (rows < L) & (tl.load(MASK + b * L + rows, mask=rows < L, other=0.0) != 0)
    lse_s = tl.load(LSE + (bh * L + rows) * 2, mask=rows < L, other=0.0)
    lse_t = tl.load(LSE + (bh * L + rows) * 2 + 1, mask=rows < L, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_DS], tl.float32)
    for n0 in range(0, L, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        keep = (cols < L) & (tl.load(MASK + b * L + cols, mask=cols < L, other=0.0) != 0)
        ks = _load_rows(KS, b, h, cols, L, DS, ks0, ks1, ks2, ks3, BLOCK_DS)
        kt = _load_rows(KT, b, h, cols, L, DT, kt0, kt1, kt2, kt3, BLOCK_DT)
        ds = _kl_probs_diff(qs, qt, ks, kt, lse_s, lse_t, row_keep, keep)
        dq += tl.dot(ds, ks, input_precision="ieee")
    d = tl.arange(0, BLOCK_DS)
    p = DQ + (bh * L + rows[:, None]) * DS + d[None, :]
    g = scale_s * tl.load(W + bh) if HAS_W else scale_s
    tl.store(p, (dq * g).to(DQ.dtype.element_ty), mask=(rows[:, None] < L) & (d[None, :] < DS))


@triton.jit
def _kl_dk_kernel(QS, KS, QT, KT, MASK, LSE, DK, W, H, L: tl.constexpr, DS, DT, scale_s, scale_t,
                  qs0, qs1, qs2, qs3, ks0, ks1, ks2, ks3, qt0, qt1, qt2, qt3, kt0, kt1, kt2, kt3,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DS: tl.constexpr, BLOCK_DT: tl.constexpr,
                  HAS_W: tl.constexpr):
    pid_n = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)  # int64: b * stride_b and bh * L * E can pass 2^31
    b = bh // H
    h = bh % H
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = (cols < L) & (tl.load(MASK + b * L + cols, mask=cols < L, other=0.0) != 0)
    ks = _load_rows(KS, b, h, cols, L, DS, ks0, ks1, ks2, ks3, BLOCK_DS)
    kt = _load_rows(KT, b, h, cols, L, DT, kt0, kt1, kt2, kt3, BLOCK_DT)
    dk = tl.zeros([BLOCK_N, BLOCK_DS], tl.float32)
    for m0 in range(0, L, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        qs = _load_rows(QS, b, h, rows, L, DS, qs0, qs1, qs2, qs3, BLOCK_DS) * scale_s
        qt = _load_rows(QT, b, h, rows, L, DT, qt0, qt1, qt2, qt3, BLOCK_DT) * scale_t
        row_keep = (rows < L) & (tl.load(MASK + b * L + rows, mask=rows < L, other=0.0) != 0)
        lse_s = tl.load(LSE + (bh * L + rows) * 2, mask=rows < L, other=0.0)
        lse_t = tl.load(LSE + (bh * L + rows) * 2 + 1, mask=rows < L, other=0.0)
        ds = _kl_probs_diff(qs, qt, ks, kt, lse_s, lse_t, row_keep, keep)
        dk += tl.dot(tl.trans(ds), qs, input_precision="ieee")
    d = tl.arange(0, BLOCK_DS)
    p = DK + (bh * L + cols[:, None]) * DS + d[None, :]
    if HAS_W:
        dk = dk * tl.load(W + bh)
    tl.store(p, dk.to(DK.dtype.element_ty), mask=(cols[:, None] < L) & (d[None, :] < DS))


def _qk_strides(q_s, k_s, q_t, k_t):
    return (*_bhld(q_s), *_bhld(k_s), *_bhld(q_t), *_bhld(k_t))


def attention_kl_fwd(q_s, k_s, q_t, k_t, mask, scale_s, scale_t, compute_grad, grad_weight=None, block_m=32,
                     block_n=32):
    """Per-(b, h) sums of row KLs [B, H] and, with compute_grad, gradients for q_s, k_s: float32 unit
    gradients, or grad_weight[b, h] times them in the inputs' dtypes."""
    B, H, L, Ds = q_s.shape
    Dt = q_t.shape[3]
    dev = q_s.device
    rows = torch.zeros(B * H * L, dtype=torch.float32, device=dev)
    lse = torch.empty(B * H * L * 2, dtype=torch.float32, device=dev)
    empty = torch.empty(0, dtype=torch.float32, device=dev)
    if B * H * L == 0:
        if not compute_grad:
            return rows.view(B, H, L).sum(-1), empty, empty.clone()
        dq, dk, _ = grad_buffers(q_s, k_s, grad_weight)
        return rows.view(B, H, L).sum(-1), dq.zero_(), dk.zero_()
    mask = mask.contiguous()
    st = _qk_strides(q_s, k_s, q_t, k_t)
    bds, bdt = block(Ds), block(Dt)
    # fp32 FMA dots on [32, 128] tiles spill with 4 warps on sm_90 (up to 668 B); 8 warps keep them in registers.
    meta = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_DS=bds, BLOCK_DT=bdt,
                num_warps=8 if max(bds, bdt) >= 128 else 4)
    grid = (triton.cdiv(L, block_m), B * H)
    _kl_fwd_kernel[grid](q_s, k_s, q_t, k_t, mask, rows, lse, H, L, Ds, Dt, scale_s, scale_t, *st, **meta)
    loss = rows.view(B, H, L).sum(-1)
    if not compute_grad:
        return loss, empty, empty.clone()
    dq, dk, w = grad_buffers(q_s, k_s, grad_weight)
    has_w = grad_weight is not None
    _kl_dq_kernel[grid](q_s, k_s, q_t, k_t, mask, lse, dq, w, H, L, Ds, Dt, scale_s, scale_t, *st, **meta,
                        HAS_W=has_w)
    grid_k = (triton.cdiv(L, block_n), B * H)
    _kl_dk_kernel[grid_k](q_s, k_s, q_t, k_t, mask, lse, dk, w, H, L, Ds, Dt, scale_s, scale_t, *st, **meta,
                          HAS_W=has_w)
    return loss, dq, dk

