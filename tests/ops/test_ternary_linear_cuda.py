"""CUDA C++ ternary GEMV and the Triton kernels on a real GPU (cuda tier: skipped without one)."""
import pytest
import torch

import kdfast
from kdfast.ops import pack_ternary, ternarize, ternary_linear
from kdfast.ops.ternary_linear import ternary_linear_reference
from tests.numerics import assert_close_to_oracle

pytestmark = pytest.mark.cuda


def make(M, N, K, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    codes, scale = ternarize(torch.randn(N, K, generator=g) * 0.05)
    x = (torch.randn(M, K, generator=g) * 10).to(dtype)
    return x, pack_ternary(codes), scale, torch.randn(N, generator=g)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M,N,K", [(1, 7, 1), (3, 33, 769), (16, 70, 3072), (100, 65, 130)])
def test_float_activations(backend, dtype, M, N, K):
    if backend == "cuda" and M > 16:
        pytest.skip("the CUDA C++ kernel is a GEMV (M <= 16); dispatch sends larger M to Triton")
    x, p, s, b = make(M, N, K, dtype, seed=M + K)
    with kdfast.use_backend(backend):
        y = ternary_linear(x.cuda(), p.cuda(), s.cuda(), b.cuda()).cpu()
    oracle = ternary_linear_reference(x.double(), p, s, b)
    assert_close_to_oracle(y, oracle, ternary_linear_reference(x, p, s, b), dtype)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("M,N,K", [(1, 7, 1), (5, 33, 769), (16, 70, 3072)])
def test_w2a8_exact(backend, M, N, K):
    x, p, s, b = make(M, N, K, torch.float32, seed=M)
    with kdfast.use_backend(backend):
        y = ternary_linear(x.cuda(), p.cuda(), s.cuda(), b.cuda(), act_bits=8).cpu()
    ref = ternary_linear_reference(x, p, s, b, act_bits=8)
    if backend == "cuda":  # integer sums and an unfused float epilogue: bitwise equal
        assert torch.equal(y, ref)
    else:
        torch.testing.assert_close(y, ref, rtol=1e-6, atol=1e-5)
