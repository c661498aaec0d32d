"""Ternary linear layer op: ``y = x @ (codes * scale)^T + bias`` with 2-bit packed weights.

Backends (``kdfast.explain("ternary_linear", x2d, packed, scale, bias, act_bits or 0)``):

    cpu:       csrc/cpu/ternary_linear.cpp (float x at large M: csrc/cpu/ternary_decode.cpp + torch GEMM)
    triton:    kdfast/kernels/triton/ternary_linear.py
    cuda:      csrc/cuda/ternary_linear.cu, glue csrc/cuda/ternary_linear_torch.cpp (GEMV, M <= 16;
               GPUs try cuda first, then triton)
    reference: this file
    backward:  this file, PyTorch (x @ dequantized weight; bias: sum of grad_output)

Two activation modes:

* ``act_bits=None``: activations stay float (fp32 / bf16 / fp16); kernels
  unpack the 2-bit weights in registers and accumulate in float32. On CPU, at
  ``M >= DENSE_MIN_ROWS[x.dtype]`` rows (fp32 128, bf16/fp16 16) the weight is
  instead decoded once per call (``torch.ops.kdfast_C.ternary_decode``) and
  multiplied by torch's GEMM in x's dtype: the result is then exactly
  ``F.linear(x, dequantized weight in x.dtype, bias)``.
* ``act_bits=8`` (W2A8): each token (row of x) is quantized to int8
  (absmax / 127, round half to even, clamp +/-127, see
  :func:`kdfast.ops.ternary_quant.quantize_activations`), dot products are
  exact int32 sums ``acc[m, n] = sum_k q[m, k] * codes[n, k]`` and
  ``y = ((float(acc) * sx[m]) * scale[n]) + bias[n]`` in float32.

Gradients flow to ``x`` (straight through the activation quantizer) and to
``bias``; packed weights and scales are constants here (train them with
:class:`kdfast.nn.TernaryLinear` in QAT mode).
"""
from __future__ import annotations

import functools

import torch

from kdfast import backends
from kdfast.ops import _checks
from kdfast.ops.ternary_quant import packed_columns, quantize_activations, unpack_ternary
from kdfast.ops.renamed_arguments import renamed_keywords

# --------------------------------------------------------------------------
# Reference: the specification every backend is tested against.
# --------------------------------------------------------------------------
def ternary_int_acc_reference(q: torch.Tensor, packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """Exact int32 ``q @ codes^T`` for int8 q ``[M, K]`` (integer math, no rounding)."""
    codes = unpack_ternary(packed, in_features)
    # Integer-valued float32 matmul is exact while every partial sum < 2^24.
    dt = torch.float32 if 127 * in_features < 2 ** 24 else torch.float64
    return (q.to(dt) @ codes.to(dt).T).to(torch.int32)


@renamed_keywords(packed="packed_weight")
def ternary_linear_reference(x: torch.Tensor, packed_weight: torch.Tensor, scale: torch.Tensor,
                             bias: torch.Tensor | None = None, *, act_bits: int | None = None) -> torch.Tensor:
    """``x [M, K]`` -> ``[M, N]`` in x's dtype (float64 in gives float64 out, the test oracle).

    Equivalent PyTorch (act_bits=None)::

        W = unpack_ternary(packed_weight, K).float() * scale[:, None]
        y = F.linear(x.float(), W, bias).to(x.dtype)
    """
    packed = packed_weight
    K = x.shape[-1]
    N = packed.shape[0]
    acc_dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    sw = scale.to(acc_dt).reshape(-1).expand(N)
    if act_bits is None or act_bits == 0:
        w = unpack_ternary(packed, K).to(acc_dt) * sw[:, None]
        y = x.to(acc_dt) @ w.T
    else:
        q, sx = quantize_activations(x, bits=act_bits)
        acc = ternary_int_acc_reference(q, packed, K)
        y = (acc.to(acc_dt) * sx.to(acc_dt)[:, None]) * sw[None, :]
    if bias is not None:
        y = y + bias.to(acc_dt)
    return y.to(x.dtype)


# --------------------------------------------------------------------------
# Custom op (schema, fake, autograd) and backends
# --------------------------------------------------------------------------
@torch.library.custom_op("kdfast::ternary_linear", mutates_args=())
def _ternary_linear(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                    act_bits: int, backend: str) -> torch.Tensor:
    return backends.run("ternary_linear", x, packed, scale, bias, act_bits, backend=backend or None)


@_ternary_linear.register_fake
def _(x, packed, scale, bias, act_bits, backend):
    return x.new_empty((x.shape[0], packed.shape[0]))


def _setup_context(ctx, inputs, output):
    x, packed, scale, bias, act_bits, backend = inputs
    ctx.save_for_backward(packed, scale)
    ctx.x_dtype = x.dtype
    ctx.K = x.shape[-1]
    ctx.has_bias = bias is not None


def _backward(ctx, grad):
    packed, scale = ctx.saved_tensors
    gx = gb = None
    if ctx.needs_input_grad[0]:
        acc = torch.float64 if grad.dtype == torch.float64 else torch.float32
        w = unpack_ternary(packed, ctx.K).to(acc) * scale.to(acc).reshape(-1, 1)
        gx = (grad.to(acc) @ w).to(ctx.x_dtype)
    if ctx.has_bias and ctx.needs_input_grad[3]:
        gb = grad.sum(0)
    return gx, None, None, gb, None, None


_ternary_linear.register_autograd(_backward, setup_context=_setup_context)


@backends.register("ternary_linear", "reference")
def _reference(x, packed, scale, bias, act_bits):
    return ternary_linear_reference(x, packed, scale, bias, act_bits=act_bits or None)


CUDA_MAX_M = 16  # the CUDA C++ kernel is a GEMV; larger M goes to the Triton GEMM
_FLOAT_OR_W2A8 = dict(dtypes=backends.kernel_dtypes("x"), values={"act_bits": (0, 8)})  # act_bits 0: float
# What each backend's kernel takes (kdfast.backends checks it; explain() reports it).
KERNEL_LIMITS = {
    "cpu": backends.Limits(**_FLOAT_OR_W2A8),
    "triton": backends.Limits(**_FLOAT_OR_W2A8),
    "cuda": backends.Limits(**_FLOAT_OR_W2A8, max_size={("x", 0): CUDA_MAX_M}),
}


def _f32(t):
    return None if t is None else t.float().contiguous()


# Float activations at large M: decode the 2-bit weights into dense rows of
# ``code * scale[n]`` in x's dtype (torch.ops.kdfast_C.ternary_decode, one
# pass) and let torch's BLAS / oneDNN GEMM do the matmul; bf16/fp16 x then
# uses the CPU's low-precision matrix units with fp32 accumulation. The
# result is exactly torch's F.linear(x, dequantized weight, bias) in x's
# dtype (code * scale is exact in fp32; in bf16/fp16 it is scale rounded once,
# as torch's own dequantized weight is). Smaller M keeps the register-unpack
# kernel, which never materialises the weights.
# Crossover M (kernel vs decode + GEMM) measured with `bench/ternary.py --crossover --threads 1`:
# the table is bench/results/ternary_crossover.md (fp32: GEMM from M=128; bf16/fp16: from M=16-64).
DENSE_MIN_ROWS = {torch.float32: 128, torch.bfloat16: 16, torch.float16: 16}
# A decoded weight larger than DENSE_SLICE_ABOVE bytes is decoded and
# multiplied in equal row slices of about DENSE_SLICE bytes: a fresh block that
# large is mapped anew by malloc on every call and page-faults (4096x11008,
# bf16, M=16, 1 thread: one 90 MB block 37 ms, 8 MiB slices 11 ms). Smaller
# weights (every BERT-base layer) are one block and one GEMM: slicing them
# costs GEMM efficiency.
DENSE_SLICE_ABOVE = 32 << 20
DENSE_SLICE = 8 << 20


@functools.lru_cache(maxsize=None)
def _fast_low_precision_gemm(dt) -> bool:
    """Whether torch's CPU GEMM in bf16 / fp16 runs on native units (oneDNN with AVX-512 BF16 / FP16 or AMX)."""
    try:
        if dt == torch.bfloat16:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except (AttributeError, RuntimeError):
        return False


def _dense_min_rows(dt) -> int:
    """Rows from which the CPU float path decodes the weight; without native bf16 / fp16 GEMM units
    a low-precision x takes the fp32 GEMM (x cast up, result cast back) and the fp32 threshold."""
    if dt != torch.float32 and not _fast_low_precision_gemm(dt):
        return DENSE_MIN_ROWS[torch.float32]
    return DENSE_MIN_ROWS[dt]


def _cpu_dense(x, packed, sw, bias):
    """``x @ (codes * sw)^T + bias`` through a decoded weight and torch's GEMM, in x's dtype."""
    if x.dtype != torch.float32 and not _fast_low_precision_gemm(x.dtype):
        return _decoded_gemm(x.float(), packed, sw, bias).to(x.dtype)
    return _decoded_gemm(x, packed, sw, bias)


def _decoded_gemm(x, packed, sw, bias):
    """_cpu_dense in x's own dtype (fp32, or bf16 / fp16 with native GEMM units)."""
    M, K = x.shape
    N = packed.shape[0]
    dt = x.dtype
    b = None if bias is None else bias.to(dt)
    nbytes = N * K * x.element_size()
    if nbytes <= DENSE_SLICE_ABOVE:
        return torch.nn.functional.linear(x, torch.ops.kdfast_C.ternary_decode(packed, sw, K, dt), b)
    nslices = -(-nbytes // DENSE_SLICE)
    rows = max(16, -(-N // nslices))
    y = x.new_empty((M, N))
    for n0 in range(0, N, rows):
        n1 = min(N, n0 + rows)
        w = torch.ops.kdfast_C.ternary_decode(packed[n0:n1], sw[n0:n1], K, dt)
        if b is None:
            torch.mm(x, w.t(), out=y[:, n0:n1])
        else:
            torch.addmm(b[n0:n1], x, w.t(), out=y[:, n0:n1])
    return y


@backends.register("ternary_linear", "cpu", limits=KERNEL_LIMITS["cpu"], kernel="ternary_linear_f32")
def _cpu(x, packed, scale, bias, act_bits):
    K, N = x.shape[1], packed.shape[0]
    sw = scale.float().reshape(-1).expand(N).contiguous()
    if act_bits == 0 and x.shape[0] >= _dense_min_rows(x.dtype):
        return _cpu_dense(x, packed.contiguous(), sw, bias)
    xf = x.float().contiguous()
    if act_bits == 8:
        y = torch.ops.kdfast_C.ternary_linear_w2a8(xf, packed.contiguous(), sw, _f32(bias), K)
    else:
        y = torch.ops.kdfast_C.ternary_linear_f32(xf, packed.contiguous(), sw, _f32(bias), K)
    return y.to(x.dtype)


@backends.register("ternary_linear", "cuda", limits=KERNEL_LIMITS["cuda"], kernel="ternary_linear_cuda")
def _cuda(x, packed, scale, bias, act_bits):
    N = packed.shape[0]
    sw = scale.float().reshape(-1).expand(N).contiguous()
    b = None if bias is None else bias.float().contiguous()
    return torch.ops.kdfast_C.ternary_linear_cuda(x.contiguous(), packed.contiguous(), sw, b, x.shape[1],
                                                  act_bits)


@backends.register("ternary_linear", "triton", limits=KERNEL_LIMITS["triton"])
def _triton(x, packed, scale, bias, act_bits):
    from kdfast.kernels.triton import ternary_linear as k
    N = packed.shape[0]
    sw = scale.float().reshape(-1).expand(N).contiguous()
    if act_bits == 8:
        q, sx = quantize_activations(x)
        return k.ternary_matmul(q, packed, sw, bias, x.shape[1], act_scale=sx, out_dtype=x.dtype)
    return k.ternary_matmul(x.contiguous(), packed, sw, bias, x.shape[1], out_dtype=x.dtype)


# GPU order: the CUDA C++ GEMV first, then Triton (not yet measured on a GPU).
backends.set_gpu_order("ternary_linear", ("cuda", "triton"))


# --------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------
def ternary_linear(x: torch.Tensor, packed_weight: torch.Tensor, scale: torch.Tensor,
                   bias: torch.Tensor | None = None, *, act_bits: int | None = None) -> torch.Tensor:
    """Linear layer with 2-bit ternary weights.

    Args:
        x: ``[..., K]`` float32 / bfloat16 / float16 (float64 runs the reference).
        packed_weight: uint8 ``[N, 16 * ceil(K / 64)]`` from
            :func:`kdfast.ops.pack_ternary` (layout in kdfast/ops/ternary_quant.py).
        scale: float ``[N]`` (per output feature) or ``[1]`` / scalar (per tensor).
        bias: optional ``[N]``.
        act_bits: None (float activations) or 8 (per-token int8 activations, W2A8).

    Returns:
        ``[..., N]`` in x's dtype.

    Equivalent PyTorch (act_bits=None)::

        F.linear(x, unpack_ternary(packed_weight, K).to(x.dtype) * scale[:, None], bias)
    """
    _checks.tensor("x", x, dtypes=_checks.FLOAT_DTYPES, min_ndim=1)
    _checks.tensor("packed_weight", packed_weight, dtypes=(torch.uint8,), ndim=2)
    _checks.tensor("scale", scale, dtypes=_checks.FLOAT_DTYPES)
    K = x.shape[-1]
    N = packed_weight.shape[0]
    if K == 0:
        raise ValueError("x must have a non-empty last dimension (in_features >= 1)")
    if packed_weight.shape[1] != packed_columns(K):
        raise ValueError(f"packed_weight must have shape [N, 16 * ceil(K / 64)] = [N, {packed_columns(K)}] for "
                         f"x with K={K} features, got {tuple(packed_weight.shape)}")
    if scale.numel() not in (1, N) or scale.dim() > 1:
        raise ValueError(f"scale must have shape [{N}] or [1], got {tuple(scale.shape)}")
    if bias is not None:
        _checks.tensor("bias", bias, dtypes=_checks.FLOAT_DTYPES, ndim=1)
        if bias.shape[0] != N:
            raise ValueError(f"bias must have shape [{N}], got {tuple(bias.shape)}")
    if act_bits not in (None, 8):
        raise ValueError(f"act_bits must be None or 8, got {act_bits!r}")
    _checks.same_device(x=x, packed_weight=packed_weight, scale=scale, bias=bias)
    x2 = x.reshape(-1, K)
    ab = act_bits or 0
    sw = scale.reshape(-1)
    # Eager: choose now, so a forced backend that cannot run fails early. Under
    # torch.compile the choice happens inside the op at run time ("" = auto).
    backend = "" if torch.compiler.is_compiling() else backends.explain(
        "ternary_linear", x2, packed_weight, sw, bias, ab).backend
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad))
    if backend and not needs_grad:
        # Eager inference: call the chosen backend directly. The custom op's
        # dispatch costs ~25 us per call (measured at M=1, 768x768: 47 -> ~20 us),
        # as much as the kernel itself at decode-sized shapes.
        y = backends.run("ternary_linear", x2, packed_weight, sw, bias, ab, backend=backend)
    else:
        y = _ternary_linear(x2, packed_weight, sw, bias, ab, backend)
    return y.reshape(*x.shape[:-1], N)
