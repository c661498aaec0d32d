"""Triton kernels of hidden_mse / hidden_cosine: projection by the vendor GEMM
(cuBLAS on GPU), loss and row gradient in one fused epilogue that overwrites
the projection in place, so the only [N, D_t] buffer is the projection itself.

Launchers take CPU tensors under TRITON_INTERPRET=1 (tests) or CUDA tensors.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


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


def hidden_mse_fwd(h_s, h_t, weight, bias, mask, kind, eps, compute_grad, grad_weight=None, block_d=128):
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
                                      BLOCK_D=min(block_d, max(16, triton.next_power_of_2(Dt))))
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
