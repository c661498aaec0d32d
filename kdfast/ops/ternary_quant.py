"""Ternary weight quantizers, 2-bit packing and int8 activation quantization.

Backends: none; these are PyTorch functions on any device (the kernels that read the
packed layout are ternary_linear's).

Packed layout (what every ternary kernel reads, and what a saved model stores)
----------------------------------------------------------------------------
A ternary matrix ``W`` of shape ``[N, K]`` (codes in {-1, 0, +1}) packs into a
``uint8`` tensor of shape ``[N, 16 * ceil(K / 64)]``:

* each row is cut into ``KB = ceil(K / 64)`` blocks of 64 weights along K,
  each block stored in 16 consecutive bytes;
* bit pair ``i`` (bits ``2i`` and ``2i+1``, i = 0..3) of byte ``j``
  (j = 0..15) of block ``b`` holds the weight at ``k = 64 * b + 16 * i + j``;
* the 2-bit code is ``weight + 1``: 0 -> -1, 1 -> 0, 2 -> +1 (3 never occurs);
* positions ``k >= K`` of the last block hold code 1, i.e. weight 0.

Why this order: shifting the 16 bytes of a block right by ``2i`` and masking
with 3 gives the codes of 16 *consecutive* k, so a whole block unpacks with
three SIMD instructions (broadcast, shift, and) into the unsigned operand of
AVX-512 VNNI ``vpdpbusd`` / AVX2 ``vpmaddubsw``, and GPU threads read whole
bytes. ``code = w + 1 >= 0`` is what makes the unsigned operand possible:
``sum_k w x = sum_k code x - sum_k x``. Storage is 2 bits per weight plus at
most 63 padding weights per row: 16x smaller than float32.

Equivalent PyTorch::

    codes = unpack_ternary(packed, K)            # int8 [N, K], values -1/0/1
    W = codes.float() * scale[:, None]           # scale [N] (row) or [1] (tensor)
"""
from __future__ import annotations

import torch

from kdfast.ops import _checks

METHODS = ("twn", "absmean", "lat")
GRANULARITIES = ("row", "tensor")
BLOCK_K = 64  # weights per 16-byte block


def packed_columns(in_features: int) -> int:
    """Bytes per packed row: ``16 * ceil(in_features / 64)``."""
    return 16 * ((in_features + BLOCK_K - 1) // BLOCK_K)


def _reduce_dims(w: torch.Tensor, granularity: str):
    return (1,) if granularity == "row" else (0, 1)


def _scale_shape(scale: torch.Tensor, granularity: str) -> torch.Tensor:
    return scale.reshape(-1) if granularity == "row" else scale.reshape(1)


def _masked_mean(a: torch.Tensor, mask: torch.Tensor, dims, weights=None) -> torch.Tensor:
    wts = torch.ones_like(a) if weights is None else weights
    num = (a * wts * mask).sum(dims, keepdim=True)
    den = (wts * mask).sum(dims, keepdim=True)
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(a.dtype).tiny), torch.zeros_like(num))


def ternarize(weight: torch.Tensor, method: str = "twn", granularity: str = "row", *, clip: float | None = 2.5,
              iters: int = 3, loss_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Ternary codes and scales of a weight matrix: ``weight ~= codes * scale``.

    Args:
        weight: ``[N, K]`` float tensor (output features x input features).
        method:
            ``"twn"`` (TernaryBERT / TWN): ``Wc = clamp(W, -clip, clip)``,
            threshold ``delta = 0.7 * mean|Wc|``, codes ``sign(Wc) * (|Wc| > delta)``,
            scale = mean ``|Wc|`` over the kept entries.
            ``"absmean"`` (BitNet b1.58): ``gamma = mean|W|``,
            codes ``clamp(round(W / gamma), -1, 1)``, scale ``gamma``.
            ``"lat"`` (loss-aware): starting from twn, ``iters`` rounds of
            ``codes = sign(W) * (|W| > scale / 2)`` and
            ``scale = sum(d |W| |codes|) / sum(d |codes|)``, which minimise
            ``sum d (W - scale * codes)^2``; ``d = loss_weights`` (e.g. Adam's
            second moment, a diagonal Hessian estimate) or 1.
        granularity: ``"row"`` (one scale per output feature) or ``"tensor"``.
        clip: clipping bound for ``"twn"`` and ``"lat"`` (None: no clipping).

    Returns:
        ``(codes, scale)``: codes int8 ``[N, K]`` in {-1, 0, 1}; scale float32
        ``[N]`` (row) or ``[1]`` (tensor). A row with no kept entry gets scale 0.
    """
    _checks.tensor("weight", weight, dtypes=_checks.FLOAT_DTYPES, ndim=2)
    _checks.choice("method", method, METHODS)
    _checks.choice("granularity", granularity, GRANULARITIES)
    if clip is not None:
        clip = _checks.positive("clip", clip)
    if loss_weights is not None and loss_weights.shape != weight.shape:
        raise ValueError(f"loss_weights must have the shape of weight {tuple(weight.shape)}, "
                         f"got {tuple(loss_weights.shape)}")
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    w = weight.detach().to(acc)
    dims = _reduce_dims(w, granularity)
    if method == "absmean":
        gamma = w.abs().mean(dims, keepdim=True).clamp_min(1e-8)
        codes = torch.clamp(torch.round(w / gamma), -1, 1)
        scale = gamma
    else:
        if clip is not None:
            w = w.clamp(-clip, clip)
        a = w.abs()
        delta = 0.7 * a.mean(dims, keepdim=True)
        keep = (a > delta).to(acc)
        scale = _masked_mean(a, keep, dims)
        if method == "lat":
            d = None if loss_weights is None else loss_weights.detach().to(acc)
            for _ in range(int(iters)):
                keep = (a > scale / 2).to(acc)
                scale = _masked_mean(a, keep, dims, d)
        codes = torch.sign(w) * keep
    return codes.to(torch.int8), _scale_shape(scale, granularity).float()


def pack_ternary(codes: torch.Tensor) -> torch.Tensor:
    """Pack int8 ternary codes ``[N, K]`` (values -1/0/1) into uint8 ``[N, 16 * ceil(K / 64)]``.

    See the module docstring for the exact layout. Works for any K >= 1 and any
    device. Equivalent to the inverse of :func:`unpack_ternary`.
    """
    _checks.tensor("codes", codes, dtypes=(torch.int8, torch.int16, torch.int32, torch.int64), ndim=2)
    N, K = codes.shape
    if K == 0:
        raise ValueError("codes must have at least one column (in_features >= 1)")
    if codes.device.type == "cpu" and not torch.compiler.is_compiling() and codes.numel():
        if bool(((codes < -1) | (codes > 1)).any()):
            raise ValueError("codes must only contain -1, 0 and 1")
    KB = (K + BLOCK_K - 1) // BLOCK_K
    c = torch.ones(N, KB * BLOCK_K, dtype=torch.uint8, device=codes.device)  # pad with code 1 = weight 0
    c[:, :K] = (codes + 1).to(torch.uint8)
    c = c.view(N, KB, 4, 16)
    packed = c[:, :, 0] | (c[:, :, 1] << 2) | (c[:, :, 2] << 4) | (c[:, :, 3] << 6)
    return packed.reshape(N, KB * 16).contiguous()


def unpack_ternary(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """Unpack uint8 ``[N, 16 * ceil(in_features / 64)]`` into int8 codes ``[N, in_features]``."""
    _checks.tensor("packed", packed, dtypes=(torch.uint8,), ndim=2)
    if not isinstance(in_features, (int, torch.SymInt)) or in_features < 1:
        raise ValueError(f"in_features must be a positive int, got {in_features!r}")
    if packed.shape[1] != packed_columns(in_features):
        raise ValueError(f"packed must have 16 * ceil(in_features / 64) = {packed_columns(in_features)} columns "
                         f"for in_features={in_features}, got shape {tuple(packed.shape)}")
    N = packed.shape[0]
    KB = packed.shape[1] // 16
    p = packed.reshape(N, KB, 1, 16)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=packed.device).view(1, 1, 4, 1)
    c = (p >> shifts) & 3
    return (c.reshape(N, KB * BLOCK_K)[:, :in_features].to(torch.int8) - 1).contiguous()


def dequantize_ternary(packed: torch.Tensor, scale: torch.Tensor, in_features: int,
                       dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dense weight ``unpack_ternary(packed, K) * scale[:, None]`` in ``dtype``, shape ``[N, K]``."""
    codes = unpack_ternary(packed, in_features)
    return codes.to(dtype) * scale.to(dtype).reshape(-1, 1)


def quantize_activations(x: torch.Tensor, bits: int = 8, granularity: str = "token",
                         clip: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric absmax quantization of activations.

    ``qmax = 2**(bits-1) - 1``; ``s = max|x| / qmax`` per token (last dim) or
    over the whole tensor (1 where that max is 0); ``q = clamp(round(x / s),
    -qmax, qmax)`` with round-half-to-even, computed in float32. With ``clip``,
    ``x`` is first clamped to ``[-clip, clip]`` (TernaryBERT's clipped
    activation range).

    Args:
        x: ``[..., K]`` float tensor.
    Returns:
        ``(q, s)``: q int8 of ``x``'s shape; s float32 of shape ``x.shape[:-1]``
        (token) or ``[]`` (tensor). ``q * s[..., None]`` approximates ``x``.
    """
    _checks.tensor("x", x, dtypes=_checks.FLOAT_DTYPES, min_ndim=1)
    _checks.choice("granularity", granularity, ("token", "tensor"))
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an int in [2, 8], got {bits!r}")
    qmax = float(2 ** (bits - 1) - 1)
    xf = x.float()
    if clip is not None:
        clip = _checks.positive("clip", clip)
        xf = xf.clamp(-clip, clip)
    if granularity == "token":
        amax = xf.abs().amax(-1) if x.shape[-1] else xf.new_zeros(x.shape[:-1])
    else:
        amax = xf.abs().amax() if x.numel() else xf.new_zeros(())
    s = amax / qmax
    s = torch.where(s == 0, torch.ones_like(s), s)
    sb = s.unsqueeze(-1) if granularity == "token" else s
    q = torch.clamp(torch.round(xf / sb), -qmax, qmax).to(torch.int8)
    return q, s
