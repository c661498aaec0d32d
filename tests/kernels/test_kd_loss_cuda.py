"""kd_loss GPU kernels (CUDA C++ and Triton) on CUDA tensors vs the float64 oracle.
Runs only where a GPU is present (tier "cuda")."""
import math

import pytest
import torch

import kdfast
from kdfast.ops.kd_loss import kd_loss
from tests.kernels.kd_loss_cases import check_against_oracle, make_inputs

pytestmark = pytest.mark.cuda

GPU_BACKENDS = ("cuda", "triton")
DIVS = ("kl", "reverse_kl", "jsd")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("divergence", DIVS)
@pytest.mark.parametrize("temperature", (1.0, 2.0, 4.0))
def test_matches_oracle(backend, divergence, temperature):
    s, t, labels = make_inputs(16, 1271, device="cuda", teacher_holes=divergence != "reverse_kl")
    check_against_oracle(backend, s, t, labels, divergence=divergence, temperature=temperature)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("V", (30522, 128256, 256000))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16))
def test_vocab_sizes_and_dtypes(backend, V, dtype):
    s, t, labels = make_inputs(8, V, dtype, device="cuda", seed=V, row_pad=5 if dtype == torch.float32 else 0)
    for div in DIVS:
        check_against_oracle(backend, s, t, labels, divergence=div, temperature=2.0)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_mixed_dtypes(backend):
    s, t, labels = make_inputs(8, 4099, torch.float16, device="cuda", seed=2)
    for div in DIVS:
        check_against_oracle(backend, s, t.to(torch.bfloat16), labels, divergence=div, temperature=2.0)
        check_against_oracle(backend, s.float(), t.to(torch.bfloat16), labels, divergence=div, temperature=2.0)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("N", (0, 1))
def test_tiny_batches(backend, N):
    s, t, labels = make_inputs(N, 1271, device="cuda", ignored=False)
    check_against_oracle(backend, s, t, labels, divergence="jsd", temperature=2.0)
    check_against_oracle(backend, s, t, None, divergence="kl", temperature=1.0, hard_weight=0.0)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_scale_100_logits(backend):
    s, t, labels = make_inputs(8, 30522, device="cuda", scale=100.0, seed=9)
    for div in DIVS:
        check_against_oracle(backend, s, t, labels, divergence=div, temperature=4.0)


def test_backends_agree_on_stats():
    s, t, labels = make_inputs(16, 30522, device="cuda", seed=4)
    for code in range(3):
        r_c, st_c = torch.ops.kdfast.kd_loss_fwd(s, t, labels, 2.0, code, 0.5, -100, True, "cuda")
        r_t, st_t = torch.ops.kdfast.kd_loss_fwd(s, t, labels, 2.0, code, 0.5, -100, True, "triton")
        torch.testing.assert_close(st_c, st_t, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(r_c, r_t, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_fully_masked_and_nan_rows(backend):
    s = torch.full((4, 3000), -math.inf, device="cuda")
    t = torch.full((4, 3000), -math.inf, device="cuda")
    s[0], t[0] = torch.randn(3000, device="cuda") * 10, torch.randn(3000, device="cuda") * 10
    s[2], t[2] = torch.randn(3000, device="cuda"), torch.randn(3000, device="cuda")
    s[2, 1234] = math.nan
    with kdfast.use_backend(backend):
        for div in DIVS:
            x = s.clone().requires_grad_()
            rows = kd_loss(x, t, divergence=div, temperature=2.0, reduction="none")
            assert torch.isfinite(rows[[0, 1, 3]]).all() and torch.all(rows[[1, 3]] == 0)
            assert torch.isnan(rows[2])
            rows[[0, 1, 3]].sum().backward()
            assert torch.all(x.grad[[1, 3]] == 0) and torch.isfinite(x.grad[0]).all()


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_compile_fullgraph(backend):
    s, t, labels = make_inputs(8, 30522, device="cuda", seed=6)

    def f(x):
        return kd_loss(x, t, labels, temperature=2.0, hard_weight=0.5)

    with kdfast.use_backend(backend):
        x = s.clone().requires_grad_()
        eager = f(x)
        eager.backward()
        y = s.clone().requires_grad_()
        comp = torch.compile(f, fullgraph=True)(y)
        comp.backward()
    torch.testing.assert_close(comp, eager)
    torch.testing.assert_close(y.grad, x.grad)
