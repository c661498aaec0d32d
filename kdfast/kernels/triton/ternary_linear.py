"""Triton kernels: activations x 2-bit packed ternary weights.

Packed layout (kdfast/ops/ternary_quant.py): row n, block b = k // 64 holds
16 bytes; weight k sits in byte ``16 b + k % 16`` at bits ``2 ((k // 16) % 4)``,
code = weight + 1. Each program gathers the bytes of its ``[BN, 64]`` weight
tile, shifts and masks in registers (never a dense weight in memory) and
accumulates ``x @ w^T`` in fp32 (float activations) or int32 (int8
activations, exact).

* GEMM path (M > 16): grid (cdiv(M, BM), cdiv(N, BN)), ``tl.dot`` tiles.
* GEMV / split-K path (M <= 16): grid (cdiv(N, BN), SPLIT_K); each program
  takes a K slice for all (<= 16) rows and atomically adds its partial sums.

The kernels return raw accumulators; the caller applies
``((acc * act_scale[m]) * scale[n]) + bias[n]``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _unpack_tile(p_ptr, offs_n, offs_k, n_mask, row_bytes, IS_INT: tl.constexpr):
    # [BN, 64] weights for columns offs_k (one 64-wide block) of rows offs_n.
    byte = (offs_k // 64) * 16 + (offs_k % 16)
    shift = ((offs_k // 16) % 4) * 2
    b = tl.load(p_ptr + offs_n[:, None] * row_bytes + byte[None, :], mask=n_mask[:, None], other=0x55)
    code = (b.to(tl.int32) >> shift[None, :]) & 3
    # One return: compiled Triton rejects a constexpr-if return followed by another of a different type.
    if IS_INT:
        w = (code - 1).to(tl.int8)
    else:
        w = (code - 1).to(tl.float32)
    return w


@triton.jit
def _gemm_kernel(x_ptr, p_ptr, acc_ptr, M, N, K, row_bytes, stride_xm,
                 BM: tl.constexpr, BN: tl.constexpr, IS_INT: tl.constexpr, PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    m_mask = offs_m < M
    n_mask = offs_n < N
    if IS_INT:
        acc = tl.zeros((BM, BN), dtype=tl.int32)
    else:
        acc = tl.zeros((BM, BN), dtype=tl.float32)
    # A while loop, not range(0, K, 64): the Triton interpreter cannot loop to a
    # runtime bound under numpy >= 2.4 (int() of a 1-element array).
    k0 = 0
    while k0 < K:
        offs_k = k0 + tl.arange(0, 64)
        k0 += 64
        k_mask = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=m_mask[:, None] & k_mask[None, :], other=0)
        w = _unpack_tile(p_ptr, offs_n, offs_k, n_mask, row_bytes, IS_INT)
        if IS_INT:
            acc = tl.dot(x, tl.trans(w), acc, out_dtype=tl.int32)
        else:
            acc += tl.dot(x.to(tl.float32), tl.trans(w), input_precision=PRECISION)
    tl.store(acc_ptr + offs_m[:, None] * N + offs_n[None, :], acc, mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _gemv_splitk_kernel(x_ptr, p_ptr, acc_ptr, M, N, K, row_bytes, stride_xm, k_per_split,
                        BM: tl.constexpr, BN: tl.constexpr, IS_INT: tl.constexpr, PRECISION: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    m_mask = offs_m < M
    n_mask = offs_n < N
    if IS_INT:
        acc = tl.zeros((BM, BN), dtype=tl.int32)
    else:
        acc = tl.zeros((BM, BN), dtype=tl.float32)
    k_start = pid_k * k_per_split
    kk = 0
    while kk < k_per_split:
        offs_k = k_start + kk + tl.arange(0, 64)
        kk += 64
        k_mask = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=m_mask[:, None] & k_mask[None, :], other=0)
        w = _unpack_tile(p_ptr, offs_n, offs_k, n_mask, row_bytes, IS_INT)
        if IS_INT:
            acc = tl.dot(x, tl.trans(w), acc, out_dtype=tl.int32)
        else:
            acc += tl.dot(x.to(tl.float32), tl.trans(w), input_precision=PRECISION)
    tl.atomic_add(acc_ptr + offs_m[:, None] * N + offs_n[None, :], acc, mask=m_mask[:, None] & n_mask[None, :])


def _precision(x) -> str:
    """Float dots: weights are exact in TF32, and so are bf16/fp16 activations (<= 10 mantissa bits);
    float32 activations need exact fp32 products ("ieee"): TF32 would round them to 10 bits on GPUs."""
    return "ieee" if x.dtype == torch.float32 else "tf32"


def ternary_accumulate(x: torch.Tensor, packed: torch.Tensor, in_features: int, *, path: str | None = None,
                       split_k: int | None = None) -> torch.Tensor:
    """Raw ``x @ codes^T``: int32 ``[M, N]`` for int8 x (exact), float32 for float x.

    ``path``: "gemm", "gemv" (split-K, M <= 16) or None (gemv for M <= 16).
    """
    M, K = x.shape
    N = packed.shape[0]
    is_int = x.dtype == torch.int8
    if x.stride(-1) != 1:
        x = x.contiguous()
    packed = packed.contiguous()
    if path is None:
        path = "gemv" if M <= 16 else "gemm"
    acc_dtype = torch.int32 if is_int else torch.float32
    if M == 0 or N == 0:
        return torch.zeros(M, N, dtype=acc_dtype, device=x.device)
    row_bytes = packed.shape[1]
    if path == "gemv":
        if M > 16:
            raise ValueError(f"gemv path takes M <= 16 rows, got M={M}")
        blocks = triton.cdiv(K, 64)
        if split_k is None:
            split_k = max(1, min(blocks, 8))
        k_per_split = triton.cdiv(blocks, split_k) * 64
        split_k = triton.cdiv(K, k_per_split)
        acc = torch.zeros(M, N, dtype=acc_dtype, device=x.device)
        BN = 64
        _gemv_splitk_kernel[(triton.cdiv(N, BN), split_k)](
            x, packed, acc, M, N, K, row_bytes, x.stride(0), k_per_split, BM=16, BN=BN, IS_INT=is_int,
            PRECISION=_precision(x))
        return acc
    acc = torch.empty(M, N, dtype=acc_dtype, device=x.device)
    BM, BN = 64, 64
    _gemm_kernel[(triton.cdiv(M, BM), triton.cdiv(N, BN))](
        x, packed, acc, M, N, K, row_bytes, x.stride(0), BM=BM, BN=BN, IS_INT=is_int, PRECISION=_precision(x))
    return acc


def ternary_matmul(x, packed, scale, bias, in_features, *, act_scale=None, out_dtype=torch.float32, path=None):
    """``y = ((acc * act_scale[m]) * scale[n]) + bias[n]`` with acc from :func:`ternary_accumulate`.

    x: float ``[M, K]`` (act_scale None) or int8 ``[M, K]`` with float32 ``act_scale [M]``.
    """
    acc = ternary_accumulate(x, packed, in_features, path=path)
    y = acc.float()
    if act_scale is not None:
        y = y * act_scale.float()[:, None]
    y = y * scale.float()[None, :]
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)
