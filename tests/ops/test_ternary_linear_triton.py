"""Triton ternary kernels under the interpreter (small shapes: the interpreter is slow)."""
import pytest
import torch

import kdfast
from kdfast.ops import pack_ternary, quantize_activations, ternarize, ternary_linear
from kdfast.ops.ternary_linear import ternary_linear_reference
from tests.numerics import assert_close_to_oracle

pytestmark = pytest.mark.triton


def make(M, N, K, seed=0):
    g = torch.Generator().manual_seed(seed)
    codes, scale = ternarize(torch.randn(N, K, generator=g) * 0.05)
    x = torch.randn(M, K, generator=g) * 10
    return x, pack_ternary(codes), scale, torch.randn(N, generator=g), codes


@pytest.mark.parametrize("M,N,K,path", [(1, 7, 1, "gemv"), (3, 70, 130, "gemv"), (16, 9, 65, "gemv"),
                                        (20, 9, 130, "gemm"), (5, 66, 70, "gemm")])
def test_accumulators(M, N, K, path):
    from kdfast.kernels.triton import ternary_linear as k
    x, p, scale, bias, codes = make(M, N, K, seed=M + N + K)
    q, _ = quantize_activations(x)
    acc = k.ternary_accumulate(q, p, K, path=path)
    assert acc.dtype == torch.int32 and torch.equal(acc.long(), q.long() @ codes.long().T)  # exact
    f = k.ternary_accumulate(x, p, K, path=path)
    oracle = x.double() @ codes.double().T
    assert_close_to_oracle(f, oracle, (x @ codes.float().T), torch.float32)


@pytest.mark.parametrize("act_bits", [None, 8])
def test_public_op_triton_backend(act_bits):
    x, p, scale, bias, _ = make(6, 10, 100)
    with kdfast.use_backend("triton"):
        y = ternary_linear(x, p, scale, bias, act_bits=act_bits)
    oracle = ternary_linear_reference(x.double(), p, scale, bias, act_bits=act_bits)
    ref = ternary_linear_reference(x, p, scale, bias, act_bits=act_bits)
    assert_close_to_oracle(y, oracle, ref, torch.float32)


def test_gemv_rejects_large_m():
    from kdfast.kernels.triton import ternary_linear as k
    x, p, _, _, _ = make(17, 4, 64)
    with pytest.raises(ValueError, match="M <= 16"):
        k.ternary_accumulate(x, p, 64, path="gemv")
