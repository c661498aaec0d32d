"""Triton kernels of attention_score_mse (TinyBERT attention-score MSE) without L x L maps.

Gram matrices. X^T X over rows for Q = [q_s*scale_s | q_t*scale_t] and
K = [k_s | -k_t] (padded rows skipped), the loss <G_Q, G_K> per head, and the
gradient rows X @ G.

Numerics and launch rules: kdfast/kernels/triton/attention_map_buffers.py.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kdfast.kernels.triton.attention_map_buffers import block, grad_buffers


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
        dq, dk, _ = grad_buffers(q_s, k_s, grad_weight)
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
    dq, dk, w = grad_buffers(q_s, k_s, grad_weight)
    has_w = grad_weight is not None
    bd = block(min(Ds, 64))
    grid_r = (triton.cdiv(L, block_l), B * H, triton.cdiv(Ds, bd))
    # d/dQ <Q^T Q, G_K> = 2 Q G_K, student columns only; the q_s block of Q carries scale_s.
    _rows_times_kernel[grid_r](Q, GK, mask, dq, w, H, L, E, Ds, 2.0 * scale_s, BLOCK_L=block_l, BLOCK_E=block_e,
                               BLOCK_D=bd, HAS_W=has_w)
    _rows_times_kernel[grid_r](K, GQ, mask, dk, w, H, L, E, Ds, 2.0, BLOCK_L=block_l, BLOCK_E=block_e, BLOCK_D=bd,
                               HAS_W=has_w)
    return loss, dq, dk

