"""Triton kernels of pruned attention (kdfast.ops.attention): forward and backward.

Flash-attention structure: one program per (query block, batch*head) in the
forward and the dQ pass, per (key block, batch*head) in the dK/dV pass. What
is skipped rather than masked:
  - keys after the last valid key of each batch row (right padding: the key
    loop stops there); interior padded keys are masked,
  - key tiles whose block-mask entry is false (the tile size divides the mask's block size BS,
    so a tile lies in one mask block; tiles stay <= 32 so large mask blocks do not blow up
    shared memory and registers: a 128 x 128 tile with D = 128 needed 320 KiB of shared memory
    in the backward, over the 227 KiB of an H100),
  - inactive heads (empty loops; outputs 0).
The head gate multiplies the output as it is written. Attention dropout
(DROPOUT) draws tl.rand(seed, offset + ((b * H + h) * Lq + i) * Lk + j) with
seed/offset read from the int64 RNG tensor (no host sync), in the forward and
again in both backward kernels (the mask is regenerated, never stored). Tests run these under
TRITON_INTERPRET=1 on CPU tensors at small shapes.

Packed variable-length input (VARLEN, FlashAttention's varlen layout: q [Tq, H, D], k/v [Tk, H, D]
with cumulative lengths cu_q / cu_k [B + 1]) runs the same three kernels: each program loads
cu[b] and cu[b + 1], so its rows are cu[b] + i for i < its sequence's length and padded tokens
never exist. The batch stride is then 0 and the row stride the token stride; LSE / delta are
[H, Tq] (query i of sequence b, head h at h * Tq + cu_q[b] + i) instead of [B, H, Lq]. Lq / Lk
are max_seqlen_q / max_seqlen_k there: they bound the loops and key the dropout counters, with
sequence-local i, j, so a packed batch draws the numbers of the same batch padded to
[B, H, max_seqlen_q, max_seqlen_k].
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


@triton.jit
def _dropout(x, RNG, bh, offs_m, offs_n, Lq, Lk, p_drop):
    """x * Z with Z = (u >= p) / (1 - p), u = tl.rand(seed, offset + ((b * H + h) * Lq + i) * Lk + j):
    the numbers of the CPU kernel and kdfast.ops.attention.attention_dropout_mask."""
    seed = tl.load(RNG)
    off = tl.load(RNG + 1) + (bh * Lq + offs_m.to(tl.int64))[:, None] * Lk + offs_n.to(tl.int64)[None, :]
    u = tl.rand(seed, off)
    return tl.where(u >= p_drop, x * (1.0 / (1.0 - p_drop)), 0.0)


@triton.jit
def _extent(CU_Q, CU_K, b, h, bh, Lq, Lk, Tq, VARLEN: tl.constexpr):
    """(q0, lq, k0, lk, lse0): a program's queries are rows q0 .. q0 + lq - 1, its keys k0 .. k0 + lk - 1,
    the LSE / delta of query i at lse0 + i (padded layout: the whole [Lq] / [Lk] of batch-head bh;
    varlen: sequence b's run of packed tokens, LSE [H, Tq])."""
    q0 = 0
    lq = Lq
    k0 = 0
    lk = Lk
    lse0 = bh * Lq
    if VARLEN:
        q0 = tl.load(CU_Q + b)
        lq = (tl.load(CU_Q + b + 1) - q0).to(tl.int32)
        k0 = tl.load(CU_K + b)
        lk = (tl.load(CU_K + b + 1) - k0).to(tl.int32)
        lse0 = h * Tq + q0
    return q0, lq, k0, lk, lse0


@triton.jit
def _fwd_kernel(Q, K, V, OUT, UNG, LSE, KMASK, KVLEN, GATES, ACTIVE, BMASK, RNG, CU_Q, CU_K,
                sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sob, soh, sol, Tq,
                g_sb, bm_sb, bm_sh, bm_sq, H, Lq, Lk, D, scale, p_drop,
                DROPOUT: tl.constexpr, VARLEN: tl.constexpr,
                HAS_KMASK: tl.constexpr, HAS_GATES: tl.constexpr, HAS_ACTIVE: tl.constexpr,
                HAS_BMASK: tl.constexpr, ZERO_PAD_Q: tl.constexpr, KEEP_UNGATED: tl.constexpr,
                IEEE: tl.constexpr, LQ_LOOP: tl.constexpr, LK_LOOP: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BS: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)  # int64: b * stride_b and bh * L * E can pass 2^31
    b = bh // H
    h = bh % H
    q0, lq, k0, lk, lse0 = _extent(CU_Q, CU_K, b, h, bh, Lq, Lk, Tq, VARLEN)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n0 = tl.arange(0, BLOCK_N)
    m_ok = offs_m < lq
    d_ok = offs_d < D
    q = tl.load(Q + b * sqb + h * sqh + (q0 + offs_m)[:, None] * sql + offs_d[None, :],
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    n_end = lk
    if HAS_KMASK:
        n_end = tl.load(KVLEN + b)
    if HAS_ACTIVE:
        n_end = n_end * tl.load(ACTIVE + h).to(tl.int32)
    if VARLEN:  # query block past this sequence's end: no key loop (nothing is stored)
        n_end = tl.where(pid_m * BLOCK_M < lq, n_end, 0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, LK_LOOP, BLOCK_N):
        keep = start_n < n_end  # keys after the last valid one (right padding) are skipped
        if HAS_BMASK:
            bm_at = b * bm_sb + h * bm_sh + ((pid_m * BLOCK_M) // BS) * bm_sq + start_n // BS
            keep = keep & (tl.load(BMASK + bm_at) != 0)
        if keep:
            offs_n = start_n + offs_n0
            n_ok = offs_n < lk
            if HAS_KMASK:
                n_ok = n_ok & (tl.load(KMASK + b * Lk + offs_n, mask=offs_n < Lk, other=0) != 0)
            k = tl.load(K + b * skb + h * skh + (k0 + offs_n)[:, None] * skl + offs_d[None, :],
                        mask=n_ok[:, None] & d_ok[None, :], other=0.0)
            v = tl.load(V + b * svb + h * svh + (k0 + offs_n)[:, None] * svl + offs_d[None, :],
                        mask=n_ok[:, None] & d_ok[None, :], other=0.0)
            if IEEE:
                s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            s = tl.where(n_ok[None, :], s * scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            if DROPOUT:
                p = _dropout(p, RNG, bh, offs_m, offs_n, Lq, Lk, p_drop)
            if IEEE:
                pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
            else:
                pv = tl.dot(p.to(v.dtype), v)
            acc = acc * alpha[:, None] + pv
            m_i = m_new
    live = l_i > 0
    if ZERO_PAD_Q:
        live = live & (tl.load(KMASK + b * Lk + offs_m, mask=m_ok, other=0) != 0)
    inv = tl.where(live, 1.0 / tl.where(live, l_i, 1.0), 0.0)
    o = acc * inv[:, None]
    gate = 1.0
    if HAS_GATES:
        gate = tl.load(GATES + b * g_sb + h).to(tl.float32)
    out_ptrs = b * sob + h * soh + (q0 + offs_m)[:, None] * sol + offs_d[None, :]
    st_mask = m_ok[:, None] & d_ok[None, :]
    tl.store(OUT + out_ptrs, (o * gate).to(OUT.dtype.element_ty), mask=st_mask)
    if KEEP_UNGATED:
        tl.store(UNG + out_ptrs, o.to(UNG.dtype.element_ty), mask=st_mask)
    lse = tl.where(live, m_i + tl.log(tl.where(live, l_i, 1.0)), float("-inf"))
    tl.store(LSE + lse0 + offs_m, lse, mask=m_ok)


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, KMASK, KVLEN, ACTIVE, BMASK, RNG, CU_Q, CU_K, DK, DV,
                     sqb, sqh, sql, skb, skh, skl, Tq, H, Lq, Lk, D, scale,
                     bm_sb, bm_sh, bm_sq, p_drop, DROPOUT: tl.constexpr, VARLEN: tl.constexpr,
                     HAS_KMASK: tl.constexpr, HAS_ACTIVE: tl.constexpr, HAS_BMASK: tl.constexpr,
                     IEEE: tl.constexpr, LQ_LOOP: tl.constexpr, LK_LOOP: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BS: tl.constexpr):
    # q, do share strides (sq*); k, v, dk, dv share strides (sk*) (the launcher makes them contiguous).
    pid_n = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)  # int64: b * stride_b and bh * L * E can pass 2^31
    b = bh // H
    h = bh % H
    q0, lq, k0, lk, lse0 = _extent(CU_Q, CU_K, b, h, bh, Lq, Lk, Tq, VARLEN)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_m0 = tl.arange(0, BLOCK_M)
    d_ok = offs_d < D
    n_ok = offs_n < lk
    if HAS_KMASK:
        n_ok = n_ok & (tl.load(KMASK + b * Lk + offs_n, mask=offs_n < Lk, other=0) != 0)
    kv_ptr = b * skb + h * skh + (k0 + offs_n)[:, None] * skl + offs_d[None, :]
    kv_mask = (offs_n < lk)[:, None] & d_ok[None, :]
    k = tl.load(K + kv_ptr, mask=n_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    v = tl.load(V + kv_ptr, mask=n_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    m_end = lq
    if HAS_ACTIVE:
        m_end = m_end * tl.load(ACTIVE + h).to(tl.int32)
    if HAS_KMASK:  # key block entirely after the last valid key: nothing to do
        m_end = tl.where(pid_n * BLOCK_N < tl.load(KVLEN + b), m_end, 0)
    if VARLEN:  # key block past this sequence's end: nothing to do (nothing is stored)
        m_end = tl.where(pid_n * BLOCK_N < lk, m_end, 0)
    for start_m in range(0, LQ_LOOP, BLOCK_M):
        keep = start_m < m_end
        if HAS_BMASK:
            bm_at = b * bm_sb + h * bm_sh + (start_m // BS) * bm_sq + (pid_n * BLOCK_N) // BS
            keep = keep & (tl.load(BMASK + bm_at) != 0)
        if keep:
            offs_m = start_m + offs_m0
            m_ok = offs_m < lq
            qp = b * sqb + h * sqh + (q0 + offs_m)[:, None] * sql + offs_d[None, :]
            q = tl.load(Q + qp, mask=m_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
            do = tl.load(DO + qp, mask=m_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
            lse = tl.load(LSE + lse0 + offs_m, mask=m_ok, other=float("inf"))
            delta = tl.load(DELTA + lse0 + offs_m, mask=m_ok, other=0.0)
            if IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
            else:
                s = tl.dot(q, tl.trans(k)) * scale
            p = tl.where(n_ok[None, :], tl.exp(s - lse[:, None]), 0.0)
            pd = p
            if DROPOUT:  # the forward's mask, regenerated: Z = keep / (1 - p_drop)
                pd = _dropout(p, RNG, bh, offs_m, offs_n, Lq, Lk, p_drop)
            if IEEE:
                dv += tl.dot(tl.trans(pd), do, input_precision="ieee")
                dp = tl.dot(do, tl.trans(v), input_precision="ieee")
            else:
                dv += tl.dot(tl.trans(pd), do)
                dp = tl.dot(do, tl.trans(v))
            if DROPOUT:
                dp = _dropout(dp, RNG, bh, offs_m, offs_n, Lq, Lk, p_drop)
            ds = p * (dp - delta[:, None])
            if IEEE:
                dk += tl.dot(tl.trans(ds), q, input_precision="ieee")
            else:
                dk += tl.dot(tl.trans(ds), q)
    tl.store(DK + kv_ptr, (dk * scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + kv_ptr, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, KMASK, KVLEN, ACTIVE, BMASK, RNG, CU_Q, CU_K, DQ,
                   sqb, sqh, sql, skb, skh, skl, Tq, H, Lq, Lk, D, scale,
                   bm_sb, bm_sh, bm_sq, p_drop, DROPOUT: tl.constexpr, VARLEN: tl.constexpr,
                   HAS_KMASK: tl.constexpr, HAS_ACTIVE: tl.constexpr, HAS_BMASK: tl.constexpr,
                   IEEE: tl.constexpr, LQ_LOOP: tl.constexpr, LK_LOOP: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BS: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)  # int64: b * stride_b and bh * L * E can pass 2^31
    b = bh // H
    h = bh % H
    q0, lq, k0, lk, lse0 = _extent(CU_Q, CU_K, b, h, bh, Lq, Lk, Tq, VARLEN)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n0 = tl.arange(0, BLOCK_N)
    m_ok = offs_m < lq
    d_ok = offs_d < D
    qp = b * sqb + h * sqh + (q0 + offs_m)[:, None] * sql + offs_d[None, :]
    q = tl.load(Q + qp, mask=m_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    do = tl.load(DO + qp, mask=m_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    lse = tl.load(LSE + lse0 + offs_m, mask=m_ok, other=float("inf"))
    delta = tl.load(DELTA + lse0 + offs_m, mask=m_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    n_end = lk
    if HAS_KMASK:
        n_end = tl.load(KVLEN + b)
    if HAS_ACTIVE:
        n_end = n_end * tl.load(ACTIVE + h).to(tl.int32)
    if VARLEN:  # query block past this sequence's end: no key loop (nothing is stored)
        n_end = tl.where(pid_m * BLOCK_M < lq, n_end, 0)
    for start_n in range(0, LK_LOOP, BLOCK_N):
        keep = start_n < n_end  # keys after the last valid one (right padding) are skipped
        if HAS_BMASK:
            bm_at = b * bm_sb + h * bm_sh + ((pid_m * BLOCK_M) // BS) * bm_sq + start_n // BS
            keep = keep & (tl.load(BMASK + bm_at) != 0)
        if keep:
            offs_n = start_n + offs_n0
            n_ok = offs_n < lk
            if HAS_KMASK:
                n_ok = n_ok & (tl.load(KMASK + b * Lk + offs_n, mask=offs_n < Lk, other=0) != 0)
            kvp = b * skb + h * skh + (k0 + offs_n)[:, None] * skl + offs_d[None, :]
            k = tl.load(K + kvp, mask=n_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
            v = tl.load(V + kvp, mask=n_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
            if IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
                dp = tl.dot(do, tl.trans(v), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k)) * scale
                dp = tl.dot(do, tl.trans(v))
            p = tl.where(n_ok[None, :], tl.exp(s - lse[:, None]), 0.0)
            if DROPOUT:
                dp = _dropout(dp, RNG, bh, offs_m, offs_n, Lq, Lk, p_drop)
            ds = p * (dp - delta[:, None])
            if IEEE:
                dq += tl.dot(ds, k, input_precision="ieee")
            else:
                dq += tl.dot(ds, k)
    tl.store(DQ + qp, (dq * scale).to(DQ.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


def _ieee(q) -> bool:
    """float32 inputs get exact fp32 dots (the numerics rule forbids tf32). Under the
    interpreter every dot runs in fp32: its bf16/fp16 dot is wrong (checked: 1e10 errors)."""
    return q.dtype == torch.float32 or os.environ.get("TRITON_INTERPRET", "0") == "1"


def _loop_bound(n: int) -> int:
    """Key/query loops run to this compile-time bound (a power of two >= n), skipping the
    iterations past n at run time: the Triton interpreter here cannot loop to a run-time
    bound, and powers of two keep recompilation to a few sizes on GPUs."""
    return max(16, triton.next_power_of_2(max(n, 1)))


def block_size_ok(block_size: int) -> bool:
    """Block-sparse layouts need a block size that tiles evenly (a power of two in [16, 128])."""
    return block_size in (16, 32, 64, 128)


_TILE = 32


def _tile(bm, bs) -> int:
    """Query/key tile: 32, or the block-mask block size when smaller (it must divide bs)."""
    return min(_TILE, bs) if bm is not None else _TILE


def _warps(ieee: bool, block_d: int) -> int:
    """8 warps for fp32 (IEEE, FMA) dots and 256-wide heads: with 4, ptxas spills on sm_90
    (fp32 D=128 forward 524 B, backward dK/dV 1568 B; bf16 D=256 dK/dV 1492 B), with 8 the
    spills go or shrink to <= 224 B (tests/kernels/test_triton_compile.py prints them)."""
    return 8 if ieee or block_d >= 256 else 4


def _prep(q, k, v, mask, active, bm):
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    kmask = kvlen = None
    if mask is not None:
        kmask = mask.to(torch.int8).contiguous()
        pos = torch.arange(1, Lk + 1, device=q.device, dtype=torch.int32)
        kvlen = (kmask.to(torch.int32) * pos).amax(-1).to(torch.int32).contiguous()  # last valid key + 1
    act = active.to(torch.int8).contiguous() if active is not None else None
    bmc = bm.to(torch.int8).contiguous() if bm is not None else None
    return B, H, Lq, Lk, D, kmask, kvlen, act, bmc


def _bm_strides(bmc, H):
    if bmc is None:
        return 0, 0, 0
    bb, bh, nq, nk = bmc.shape
    return (0 if bb == 1 else bh * nq * nk), (0 if bh == 1 else nq * nk), nk


def attention_fwd(q, k, v, mask, gates, active, bm, bs, scale, zero_padded_queries, keep_ungated, dropout_p=0.0,
                  rng=None):
    B, H, Lq, Lk, D, kmask, kvlen, act, bmc = _prep(q, k, v, mask, active, bm)
    out = q.new_empty((B, Lq, H, D)).transpose(1, 2)
    ung = q.new_empty((B, Lq, H, D)).transpose(1, 2) if keep_ungated else q.new_empty((0,))
    lse = torch.empty((B, H, Lq), device=q.device, dtype=torch.float32)
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    v = v if v.stride(-1) == 1 else v.contiguous()
    BM = BN = _tile(bm, bs)
    BD = max(16, triton.next_power_of_2(D))
    g = gates.contiguous() if gates is not None else None
    g_sb = 0 if gates is None or gates.dim() == 1 else H
    bm_sb, bm_sh, bm_sq = _bm_strides(bmc, H)
    dummy = lse
    grid = (triton.cdiv(Lq, BM), B * H)
    _fwd_kernel[grid](
        q, k, v, out, ung if keep_ungated else out, lse,
        kmask if kmask is not None else dummy, kvlen if kvlen is not None else dummy,
        g if g is not None else dummy, act if act is not None else dummy, bmc if bmc is not None else dummy,
        rng if dropout_p > 0 else dummy, dummy, dummy,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2), 0,
        g_sb, bm_sb, bm_sh, bm_sq, H, Lq, Lk, D, scale, float(dropout_p), DROPOUT=dropout_p > 0, VARLEN=False,
        HAS_KMASK=mask is not None, HAS_GATES=gates is not None, HAS_ACTIVE=active is not None,
        HAS_BMASK=bm is not None, ZERO_PAD_Q=bool(zero_padded_queries and mask is not None),
        KEEP_UNGATED=bool(keep_ungated), IEEE=_ieee(q),
        LQ_LOOP=_loop_bound(Lq), LK_LOOP=_loop_bound(Lk), BLOCK_M=BM, BLOCK_N=BN, BLOCK_D=BD,
        BS=bs if bm is not None else BM, num_warps=_warps(_ieee(q), BD))
    return out, lse, ung


def attention_bwd(grad_out, q, k, v, out, ung, lse, mask, gates, active, bm, bs, scale, zero_padded_queries,
                  dropout_p=0.0, rng=None):
    B, H, Lq, Lk, D, kmask, kvlen, act, bmc = _prep(q, k, v, mask, active, bm)
    go = grad_out.float()
    dg = q.new_empty((0,))
    if gates is not None:
        g = (gates if gates.dim() == 2 else gates[None, :]).float()
        if ung.numel():
            dgf = (go * ung.float()).sum((-1, -2))
            dg = dgf if gates.dim() == 2 else dgf.sum(0)
        else:  # gates without grad: their gradient is not used
            dg = torch.zeros(gates.shape, device=q.device, dtype=torch.float32)
        go = go * g[:, :, None, None]
    # rowsum(dO_ungated * O_ungated) = rowsum(grad_out * out): no division by the gate.
    delta = (grad_out.float() * out.float()).sum(-1).contiguous()
    lse_b = torch.where(torch.isfinite(lse), lse, torch.full_like(lse, float("inf"))).contiguous()
    qc = q.contiguous()
    do = go.to(q.dtype).contiguous()
    kc, vc = k.contiguous(), v.contiguous()
    dq = torch.empty_like(qc)
    dk = torch.empty_like(kc)
    dv = torch.empty_like(vc)
    BM = BN = _tile(bm, bs)
    BD = max(16, triton.next_power_of_2(D))
    bm_sb, bm_sh, bm_sq = _bm_strides(bmc, H)
    dummy = lse_b
    common = dict(DROPOUT=dropout_p > 0, VARLEN=False, HAS_KMASK=mask is not None, HAS_ACTIVE=active is not None, HAS_BMASK=bm is not None,
                  IEEE=_ieee(q), LQ_LOOP=_loop_bound(Lq), LK_LOOP=_loop_bound(Lk),
                  BLOCK_M=BM, BLOCK_N=BN, BLOCK_D=BD, BS=bs if bm is not None else BM,
                  num_warps=_warps(_ieee(q), BD))
    km = kmask if kmask is not None else dummy
    ac = act if act is not None else dummy
    bmp = bmc if bmc is not None else dummy
    _bwd_dkdv_kernel[(triton.cdiv(Lk, BN), B * H)](
        qc, kc, vc, do, lse_b, delta, km, kvlen if kvlen is not None else dummy, ac, bmp, rng if dropout_p > 0 else dummy,
        dummy, dummy, dk, dv,
        qc.stride(0), qc.stride(1), qc.stride(2), kc.stride(0), kc.stride(1), kc.stride(2), 0,
        H, Lq, Lk, D, scale, bm_sb, bm_sh, bm_sq, float(dropout_p), **common)
    _bwd_dq_kernel[(triton.cdiv(Lq, BM), B * H)](
        qc, kc, vc, do, lse_b, delta, km, kvlen if kvlen is not None else dummy, ac, bmp, rng if dropout_p > 0 else dummy,
        dummy, dummy, dq,
        qc.stride(0), qc.stride(1), qc.stride(2), kc.stride(0), kc.stride(1), kc.stride(2), 0,
        H, Lq, Lk, D, scale, bm_sb, bm_sh, bm_sq, float(dropout_p), **common)
    return dq, dk, dv, dg.float() if gates is not None else dg


# --------------------------------------------------------------------------
# Packed variable-length input: q [Tq, H, D], k/v [Tk, H, D], cu_q / cu_k [B + 1]
# --------------------------------------------------------------------------
def _varlen_prep(q, cu_q, cu_k, active):
    T, H, D = q.shape
    B = cu_q.numel() - 1
    cu_q = cu_q.to(device=q.device, dtype=torch.int64).contiguous()
    cu_k = cu_k.to(device=q.device, dtype=torch.int64).contiguous()
    act = active.to(torch.int8).contiguous() if active is not None else None
    return T, H, D, B, cu_q, cu_k, act


def _unit_last(x):
    return x if x.stride(-1) == 1 else x.contiguous()


def _token_batch(cu_q, T):
    """Batch row of every packed query token (B for the tokens past cu_q[-1]); no host sync."""
    return torch.searchsorted(cu_q[1:], torch.arange(T, device=cu_q.device, dtype=torch.int64), right=True)


def attention_varlen_fwd(q, k, v, cu_q, cu_k, max_q, max_k, gates, active, scale, keep_ungated, dropout_p=0.0,
                         rng=None):
    """(out [Tq, H, D], lse [H, Tq] float32, ungated out or empty): tokens past cu_q[-1] give 0 / -inf."""
    T, H, D, B, cu_q, cu_k, act = _varlen_prep(q, cu_q, cu_k, active)
    out = q.new_zeros((T, H, D))
    ung = q.new_zeros((T, H, D)) if keep_ungated else q.new_empty((0,))
    lse = torch.full((H, T), float("-inf"), device=q.device, dtype=torch.float32)
    if B <= 0 or max_q <= 0 or T == 0:
        return out, lse, ung
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    BM = BN = _TILE
    BD = max(16, triton.next_power_of_2(D))
    g = gates.contiguous() if gates is not None else None
    g_sb = 0 if gates is None or gates.dim() == 1 else H
    dummy = lse
    _fwd_kernel[(triton.cdiv(max_q, BM), B * H)](
        q, k, v, out, ung if keep_ungated else out, lse, dummy, dummy,
        g if g is not None else dummy, act if act is not None else dummy, dummy,
        rng if dropout_p > 0 else dummy, cu_q, cu_k,
        0, q.stride(1), q.stride(0), 0, k.stride(1), k.stride(0),
        0, v.stride(1), v.stride(0), 0, out.stride(1), out.stride(0), T,
        g_sb, 0, 0, 0, H, max_q, max_k, D, scale, float(dropout_p), DROPOUT=dropout_p > 0, VARLEN=True,
        HAS_KMASK=False, HAS_GATES=gates is not None, HAS_ACTIVE=active is not None,
        HAS_BMASK=False, ZERO_PAD_Q=False, KEEP_UNGATED=bool(keep_ungated), IEEE=_ieee(q),
        LQ_LOOP=_loop_bound(max_q), LK_LOOP=_loop_bound(max_k), BLOCK_M=BM, BLOCK_N=BN, BLOCK_D=BD,
        BS=BM, num_warps=_warps(_ieee(q), BD))
    return out, lse, ung


def attention_varlen_bwd(grad_out, q, k, v, out, ung, lse, cu_q, cu_k, max_q, max_k, gates, active, scale,
                         dropout_p=0.0, rng=None):
    """(dq, dk, dv, d gates float32 or empty); ``out`` is the forward's (gated) output."""
    T, H, D, B, cu_q, cu_k, act = _varlen_prep(q, cu_q, cu_k, active)
    go = grad_out.float()
    dg = q.new_empty((0,))
    if gates is not None:
        if gates.dim() == 1:
            g_tok = gates.float()[None, :]
        else:  # per-sequence gates: each token takes its sequence's row (tokens past the end: 0)
            bt = _token_batch(cu_q, T)
            g_tok = torch.cat([gates.float(), gates.new_zeros((1, H), dtype=torch.float32)])[bt]
        if ung.numel():
            per = (go * ung.float()).sum(-1)  # [T, H]
            dg = per.sum(0) if gates.dim() == 1 else \
                per.new_zeros((B + 1, H)).index_add_(0, _token_batch(cu_q, T), per)[:B]
        else:  # gates without grad: their gradient is not used
            dg = torch.zeros(gates.shape, device=q.device, dtype=torch.float32)
        go = go * g_tok[:, :, None]
    # rowsum(dO_ungated * O_ungated) = rowsum(grad_out * out), [H, T] like the LSE
    delta = (grad_out.float() * out.float()).sum(-1).t().contiguous()
    lse_b = torch.where(torch.isfinite(lse), lse, torch.full_like(lse, float("inf"))).contiguous()
    qc = q.contiguous()
    do = go.to(q.dtype).contiguous()
    kc, vc = k.contiguous(), v.contiguous()
    dq, dk, dv = torch.zeros_like(qc), torch.zeros_like(kc), torch.zeros_like(vc)
    if B <= 0 or max_q <= 0 or max_k <= 0 or T == 0 or k.shape[0] == 0:
        return dq, dk, dv, dg
    BM = BN = _TILE
    BD = max(16, triton.next_power_of_2(D))
    dummy = lse_b
    common = dict(DROPOUT=dropout_p > 0, VARLEN=True, HAS_KMASK=False, HAS_ACTIVE=active is not None,
                  HAS_BMASK=False, IEEE=_ieee(q), LQ_LOOP=_loop_bound(max_q), LK_LOOP=_loop_bound(max_k),
                  BLOCK_M=BM, BLOCK_N=BN, BLOCK_D=BD, BS=BM, num_warps=_warps(_ieee(q), BD))
    ac = act if act is not None else dummy
    rg = rng if dropout_p > 0 else dummy
    strides = (0, qc.stride(1), qc.stride(0), 0, kc.stride(1), kc.stride(0), T, H, max_q, max_k, D, scale,
               0, 0, 0, float(dropout_p))
    _bwd_dkdv_kernel[(triton.cdiv(max_k, BN), B * H)](
        qc, kc, vc, do, lse_b, delta, dummy, dummy, ac, dummy, rg, cu_q, cu_k, dk, dv, *strides, **common)
    _bwd_dq_kernel[(triton.cdiv(max_q, BM), B * H)](
        qc, kc, vc, do, lse_b, delta, dummy, dummy, ac, dummy, rg, cu_q, cu_k, dq, *strides, **common)
    return dq, dk, dv, dg
