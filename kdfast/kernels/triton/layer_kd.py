"""Triton kernels for layer distillation losses without L x L maps.

attention_kl: flash-style. One program per (query block, batch*head)
streams key blocks once, keeping for each row the running maxima and
denominators of both softmaxes and E_{p_t}[S_t - S_s] rescaled like the
teacher's denominator (so the KL needs one pass). Gradients of the summed loss
take two more streaming kernels (dq over key blocks, dk over query blocks)
using the saved per-row log-sum-exps, so nothing of size L x L is stored.

attention_score_mse: Gram matrices. X^T X over rows for Q = [q_s*scale_s |
q_t*scale_t] and K = [k_s | -k_t] (padded rows skipped), the loss
<G_Q, G_K> per head, and the gradient rows X @ G.

All dots run in float32 with input_precision="ieee" (exact float32, no TF32),
so float32 results match the float64 oracle like PyTorch's float32 matmul.
Launchers take CPU tensors under TRITON_INTERPRET=1 (tests) or CUDA tensors.
Loop bounds (L, E) are compile-time constants: one compile per sequence
length, and the triton 3.6 interpreter cannot loop to a runtime bound under
numpy >= 2.4.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# Start of the running maxima: finite, so exp(m_old - m_new) never sees -inf - -inf on fully padded
# key blocks (a constexpr: compiled Triton refuses plain Python globals).
_MINF = tl.constexpr(-1.0e30)


def _block(d: int) -> int:
    return max(16, triton.next_power_of_2(int(d)))


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


def _grad_outputs(q_s, k_s, grad_weight):
    """Gradient buffers: float32 unit gradients, or the inputs' dtypes when grad_weight [B, H] weights them;
    and the weight argument of the kernels (a dummy pointer when absent)."""
    B, H, L, Ds = q_s.shape
    dq = torch.empty(B, H, L, Ds, dtype=torch.float32 if grad_weight is None else q_s.dtype, device=q_s.device)
    dk = torch.empty(B, H, L, Ds, dtype=torch.float32 if grad_weight is None else k_s.dtype, device=q_s.device)
    w = dq if grad_weight is None else grad_weight.float().contiguous()
    return dq, dk, w


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
        dq, dk, _ = _grad_outputs(q_s, k_s, grad_weight)
        return rows.view(B, H, L).sum(-1), dq.zero_(), dk.zero_()
    mask = mask.contiguous()
    st = _qk_strides(q_s, k_s, q_t, k_t)
    bds, bdt = _block(Ds), _block(Dt)
    # fp32 FMA dots on [32, 128] tiles spill with 4 warps on sm_90 (up to 668 B); 8 warps keep them in registers.
    meta = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_DS=bds, BLOCK_DT=bdt,
                num_warps=8 if max(bds, bdt) >= 128 else 4)
    grid = (triton.cdiv(L, block_m), B * H)
    _kl_fwd_kernel[grid](q_s, k_s, q_t, k_t, mask, rows, lse, H, L, Ds, Dt, scale_s, scale_t, *st, **meta)
    loss = rows.view(B, H, L).sum(-1)
    if not compute_grad:
        return loss, empty, empty.clone()
    dq, dk, w = _grad_outputs(q_s, k_s, grad_weight)
    has_w = grad_weight is not None
    _kl_dq_kernel[grid](q_s, k_s, q_t, k_t, mask, lse, dq, w, H, L, Ds, Dt, scale_s, scale_t, *st, **meta,
                        HAS_W=has_w)
    grid_k = (triton.cdiv(L, block_n), B * H)
    _kl_dk_kernel[grid_k](q_s, k_s, q_t, k_t, mask, lse, dk, w, H, L, Ds, Dt, scale_s, scale_t, *st, **meta,
                          HAS_W=has_w)
    return loss, dq, dk


# --------------------------------------------------------------------------
# attention_score_mse
# --------------------------------------------------------------------------
@triton.jit
def _gram_kernel(X, MASK, G, H, L: tl.constexpr, E: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_E: tl.constexpr):
    """G[bh, a-block, c-block] = sum over kept rows l of X[bh, l, a] X[bh, l, c] (X contiguous [BH, L, E])."""
    bh = tl.program_id(0).to(tl.int64)  # int64: b * stride_b and bh * L * E can pass 2^31
    ia = tl.program_id(1)
    ic = tl.program_id(2)
    b = bh // H
    ea = ia * BLOCK_E + tl.arange(0, BLOCK_E)
    ec = ic * BLOCK_E + tl.arange(0, BLOCK_E)
    acc = tl.zeros([BLOCK_E, BLOCK_E], tl.float32)
    for l0 in range(0, L, BLOCK_L):
        rows = l0 + tl.arange(0, BLOCK_L)
        keep = (rows < L) & (tl.load(MASK + b * L + rows, mask=rows < L, other=0.0) != 0)
        base = X + (bh * L + rows[:, None]) * E
        xa = tl.load(base + ea[None, :], mask=keep[:, None] & (ea[None, :] < E), other=0.0)
        xc = tl.load(base + ec[None, :], mask=keep[:, None] & (ec[None, :] < E), other=0.0)
        acc += tl.dot(tl.trans(xa), xc, input_precision="ieee")
    p = G + bh * E * E + ea[:, None] * E + ec[None, :]
    tl.store(p, acc, mask=(ea[:, None] < E) & (ec[None, :] < E))


@triton.jit
def _rows_times_kernel(X, G, MASK, OUT, W, H, L: tl.constexpr, E: tl.constexpr, DOUT, scale,
                       BLOCK_L: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr, HAS_W: tl.constexpr):
    """OUT[bh, rows, d-block] = scale (* W[bh]) * X[bh, rows, :] @ G[bh, :, d-block] on kept rows, else 0,
    in OUT's dtype."""
    pid_l = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)  # int64: b * stride_b and bh * L * E can pass 2^31
    pid_d = tl.program_id(2)
    b = bh // H
    rows = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    keep = (rows < L) & (tl.load(MASK + b * L + rows, mask=rows < L, other=0.0) != 0)
    acc = tl.zeros([BLOCK_L, BLOCK_D], tl.float32)
    for e0 in range(0, E, BLOCK_E):
        e = e0 + tl.arange(0, BLOCK_E)
        x = tl.load(X + (bh * L + rows[:, None]) * E + e[None, :], mask=keep[:, None] & (e[None, :] < E), other=0.0)
        g = tl.load(G + bh * E * E + e[:, None] * E + d[None, :], mask=(e[:, None] < E) & (d[None, :] < DOUT),
                    other=0.0)
        acc += tl.dot(x, g, input_precision="ieee")
    g = scale * tl.load(W + bh) if HAS_W else scale
    tl.store(OUT + (bh * L + rows[:, None]) * DOUT + d[None, :], (acc * g).to(OUT.dtype.element_ty),
             mask=(rows[:, None] < L) & (d[None, :] < DOUT))


def attention_score_mse_fwd(q_s, k_s, q_t, k_t, mask, scale_s, scale_t, compute_grad, grad_weight=None,
                            block_l=32, block_e=32):
    """Per-(b, h) sums of squared score differences [B, H] and optional gradients (float32 unit gradients,
    or grad_weight[b, h] times them in the inputs' dtypes)."""
    B, H, L, Ds = q_s.shape
    Dt = q_t.shape[3]
    E = Ds + Dt
    dev = q_s.device
    empty = torch.empty(0, dtype=torch.float32, device=dev)
    if B * H * L == 0:
        loss = torch.zeros(B, H, dtype=torch.float32, device=dev)
        if not compute_grad:
            return loss, empty, empty.clone()
        dq, dk, _ = _grad_outputs(q_s, k_s, grad_weight)
        return loss, dq.zero_(), dk.zero_()
    mask = mask.contiguous()
    # Concatenated operands (O(B H L (Ds + Dt)), like the inputs), float32 contiguous.
    Q = torch.cat([q_s.float() * scale_s, q_t.float() * scale_t], -1).contiguous()
    K = torch.cat([k_s.float(), -k_t.float()], -1).contiguous()
    GQ = torch.empty(B * H, E, E, dtype=torch.float32, device=dev)
    GK = torch.empty_like(GQ)
    grid = (B * H, triton.cdiv(E, block_e), triton.cdiv(E, block_e))
    _gram_kernel[grid](Q, mask, GQ, H, L, E, BLOCK_L=block_l, BLOCK_E=block_e)
    _gram_kernel[grid](K, mask, GK, H, L, E, BLOCK_L=block_l, BLOCK_E=block_e)
    loss = (GQ * GK).sum((-1, -2)).view(B, H)
    if not compute_grad:
        return loss, empty, empty.clone()
    dq, dk, w = _grad_outputs(q_s, k_s, grad_weight)
    has_w = grad_weight is not None
    bd = _block(min(Ds, 64))
    grid_r = (triton.cdiv(L, block_l), B * H, triton.cdiv(Ds, bd))
    # d/dQ <Q^T Q, G_K> = 2 Q G_K, student columns only; the q_s block of Q carries scale_s.
    _rows_times_kernel[grid_r](Q, GK, mask, dq, w, H, L, E, Ds, 2.0 * scale_s, BLOCK_L=block_l, BLOCK_E=block_e,
                               BLOCK_D=bd, HAS_W=has_w)
    _rows_times_kernel[grid_r](K, GQ, mask, dk, w, H, L, E, Ds, 2.0, BLOCK_L=block_l, BLOCK_E=block_e, BLOCK_D=bd,
                               HAS_W=has_w)
    return loss, dq, dk


# --------------------------------------------------------------------------
# hidden_loss: projection by the vendor GEMM (cuBLAS on GPU), loss and row
# gradient in one fused epilogue that overwrites the projection in place, so
# the only [N, D_t] buffer is the projection itself.
# --------------------------------------------------------------------------
@triton.jit
def _hidden_epilogue_kernel(Y, T, MASK, ROWS, DT: tl.constexpr, st, eps, KIND: tl.constexpr,
                            BLOCK_D: tl.constexpr):
    """Row r: loss ||y - t||^2 (KIND 0) or 1 - cos(y, t) (KIND 1); y <- d loss / d y (0 on masked rows)."""
    r = tl.program_id(0).to(tl.int64)
    keep = tl.load(MASK + r) != 0
    y_row = Y + r * DT
    t_row = T + r * st
    d0 = tl.arange(0, BLOCK_D)
    if KIND == 0:
        acc = tl.zeros([BLOCK_D], tl.float32)
        for c0 in range(0, DT, BLOCK_D):
            d = c0 + d0
            ok = d < DT
            y = tl.load(y_row + d, mask=ok, other=0.0)
            t = tl.load(t_row + d, mask=ok, other=0.0).to(tl.float32)
            diff = tl.where(keep, y - t, 0.0)
            acc += diff * diff
            tl.store(y_row + d, 2.0 * diff, mask=ok)
        tl.store(ROWS + r, tl.sum(acc, 0))
    else:
        yy = tl.zeros([BLOCK_D], tl.float32)
        tt = tl.zeros([BLOCK_D], tl.float32)
        yt = tl.zeros([BLOCK_D], tl.float32)
        for c0 in range(0, DT, BLOCK_D):
            d = c0 + d0
            ok = d < DT
            y = tl.load(y_row + d, mask=ok, other=0.0)
            t = tl.load(t_row + d, mask=ok, other=0.0).to(tl.float32)
            yy += y * y
            tt += t * t
            yt += y * t
        syy = tl.sum(yy, 0)
        prod = tl.sqrt(syy) * tl.sqrt(tl.sum(tt, 0))
        den = tl.maximum(prod, eps)
        cos = tl.sum(yt, 0) / den
        # d(1 - cos)/dy = -t / den + cos * y / |y|^2 (the clamped branch: -t / eps)
        a = tl.where(keep, -1.0 / den, 0.0)
        c = tl.where(keep & (prod > eps) & (syy > 0), cos / syy, 0.0)
        for c0 in range(0, DT, BLOCK_D):
            d = c0 + d0
            ok = d < DT
            y = tl.load(y_row + d, mask=ok, other=0.0)
            t = tl.load(t_row + d, mask=ok, other=0.0).to(tl.float32)
            tl.store(y_row + d, a * t + c * y, mask=ok)
        tl.store(ROWS + r, tl.where(keep, 1.0 - cos, 0.0))


def hidden_loss_fwd(h_s, h_t, weight, bias, mask, kind, eps, compute_grad, grad_weight=None, block_d=128):
    """Loss sum over valid rows and optional gradients (dh_s, dW, db), like the CPU kernel: float32 unit
    gradients, or grad_weight (0-d) times them in the inputs' dtypes."""
    N, Dt = h_t.shape
    dev = h_s.device
    empty = torch.empty(0, dtype=torch.float32, device=dev)
    hs = h_s.float()
    if weight is not None:
        w = weight.float()
        y = torch.addmm(bias.float(), hs, w.t()) if bias is not None else hs @ w.t()
    else:
        y = hs + bias.float() if bias is not None else hs.clone()
    y = y.contiguous()
    t = h_t if h_t.stride(-1) == 1 else h_t.contiguous()
    rows = torch.empty(N, dtype=torch.float32, device=dev)
    if N > 0:
        _hidden_epilogue_kernel[(N,)](y, t, mask.contiguous(), rows, Dt, t.stride(0), float(eps), KIND=int(kind),
                                      BLOCK_D=min(block_d, _block(Dt)))
    loss = rows.sum()
    if not compute_grad:
        return loss, empty, empty.clone(), empty.clone()
    gy = y  # the epilogue left d(loss)/dy in place
    if grad_weight is not None:
        gy.mul_(grad_weight.float())
    dh = gy @ w if weight is not None else gy
    dw = gy.t() @ hs if weight is not None else empty
    db = gy.sum(0) if bias is not None else empty.clone()
    if grad_weight is None:
        return loss, dh, dw, db
    return (loss, dh.to(h_s.dtype), dw.to(weight.dtype) if weight is not None else dw,
            db.to(bias.dtype) if bias is not None else db)
