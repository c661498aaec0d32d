import pytest
import torch

import kdfast
from kdfast import cpu_isa
from kdfast.ops import attention_score_mse, attention_score_mse_reference
from kdfast.ops.attention_score_mse import _fwd
from tests.ops.attention_cases import (BACKENDS, cpu_row_access_tests, isa_list, make_inputs,
                                     run_case, run_double_backward)


def _shape(backend):
    return (4, 2, 37 if backend == "triton" else 97, 16, 24)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_matches_oracle(backend, dtype):
    run_case(attention_score_mse, attention_score_mse_reference, backend, make_inputs(*_shape(backend)), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_tensor_as_q_and_k(backend):
    run_case(attention_score_mse, attention_score_mse_reference, backend, make_inputs(3, 2, 29, 8, 32, seed=3),
             torch.float32, value=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_length_one(backend):
    run_case(attention_score_mse, attention_score_mse_reference, backend, make_inputs(2, 3, 1, 16, 16, lengths=[1, 0]),
             torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16(backend):
    run_case(attention_score_mse, attention_score_mse_reference, backend,
             make_inputs(2, 2, 33, 16, 16, scale=1.5, seed=5), torch.float16)


@pytest.mark.cpu
@pytest.mark.parametrize("isa", isa_list())
def test_cpu_isa_paths(isa):
    with cpu_isa.use_cpu_isa(isa):
        run_case(attention_score_mse, attention_score_mse_reference, "cpu", make_inputs(3, 2, 70, 16, 8, seed=7),
                 torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_student_equals_teacher_gives_zero(backend):
    q, k, _, _, mask = (x.float() if x.is_floating_point() else x for x in make_inputs(2, 2, 19, 8, 8))
    with kdfast.use_backend(backend):
        out = attention_score_mse(q, k, q, k, mask)
    # The Gram form cancels ||S||^2 terms: zero up to float32 rounding of those terms.
    scale = attention_score_mse_reference(q.double(), k.double(), torch.zeros_like(q).double(), k.double(), mask)
    assert abs(out.item()) <= 1e-5 * scale.item()


def test_all_padding_gives_zero():
    q_s, k_s, q_t, k_t, _ = make_inputs(2, 2, 5, 4, 4)
    q_s = q_s.float().requires_grad_()
    out = attention_score_mse(q_s, k_s.float(), q_t.float(), k_t.float(), torch.zeros(2, 5, dtype=torch.bool))
    out.backward()
    assert out.item() == 0.0 and torch.all(q_s.grad == 0)


def test_teacher_gets_no_gradient():
    q_s, k_s, q_t, k_t, mask = make_inputs(2, 2, 6, 4, 4)
    q_s, k_s, q_t = (x.float().requires_grad_() for x in (q_s, k_s, q_t))
    attention_score_mse(q_s, k_s, q_t, k_t.float(), mask).backward()
    assert q_t.grad is None and k_s.grad is not None


def test_denominator_is_valid_pairs_times_heads():
    B, H, L, D = 2, 3, 6, 4
    q_s, k_s = torch.randn(B, H, L, D), torch.randn(B, H, L, D)
    q_t, k_t = torch.randn(B, H, L, D), torch.randn(B, H, L, D)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]])
    s = q_s @ k_s.transpose(-1, -2) / 2
    t = q_t @ k_t.transpose(-1, -2) / 2
    expect = (((s - t)[0, :, :3, :3] ** 2).sum() + ((s - t)[1, :, :5, :5] ** 2).sum()) / (H * (9 + 25))
    assert torch.allclose(attention_score_mse(q_s, k_s, q_t, k_t, mask), expect, rtol=1e-4)


def test_bad_inputs():
    x = torch.randn(2, 4, 5, 8)
    with pytest.raises(ValueError, match="same number of heads"):
        attention_score_mse(x, x, torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8))
    with pytest.raises(ValueError, match="mask must be"):
        attention_score_mse(x, x, x, x, torch.ones(3, 5))
    with pytest.raises(ValueError, match="k_t must have the shape"):
        attention_score_mse(x, x, x, torch.randn(2, 4, 5, 3))
    with pytest.raises(TypeError, match="q_s must be a torch.Tensor"):
        attention_score_mse(None, x, x, x)


@pytest.mark.parametrize("backend", [pytest.param("reference"), pytest.param("cpu", marks=pytest.mark.cpu)])
def test_opcheck(backend):
    q_s, k_s, q_t, k_t, mask = (x.float().contiguous() for x in make_inputs(2, 2, 7, 4, 8))
    q_s.requires_grad_()
    k_s.requires_grad_()
    for grad in (True, False):
        torch.library.opcheck(_fwd, (q_s, k_s, q_t, k_t, mask, 0.5, 0.35, grad, None, backend))
    # Weighted gradients in the inputs' dtype, without autograd (see test_attention_kl.test_opcheck).
    w = torch.rand(2, 2) + 0.5
    for dt in (torch.float32, torch.bfloat16):
        torch.library.opcheck(_fwd, (q_s.detach().to(dt), k_s.detach().to(dt), q_t, k_t, mask, 0.5, 0.35, True, w,
                                     backend))


def test_torch_compile_fullgraph():
    q_s, k_s, q_t, k_t, mask = (x.float() for x in make_inputs(2, 2, 7, 4, 8))
    k_s.requires_grad_()
    fn = torch.compile(lambda a, b, c, d, m: attention_score_mse(a, b, c, d, m), fullgraph=True, backend="aot_eager")
    out = fn(q_s, k_s, q_t, k_t, mask)
    out.backward()
    ref = attention_score_mse_reference(q_s.double(), k_s.double(), q_t.double(), k_t.double(), mask)
    assert abs(out.item() - ref.item()) < 1e-4 * max(1, ref.item())
    assert k_s.grad is not None and torch.isfinite(k_s.grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_second_backward_recomputes(backend, dtype):
    small = backend == "triton"  # the interpreter is slow
    inputs = make_inputs(3, 2, 13 if small else 45, 8, 16, seed=11)
    run_double_backward(attention_score_mse, attention_score_mse_reference, backend, inputs, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_grad_output_one(backend, dtype):
    # grad_output 1: on the CPU the gradients the forward wrote (in the input dtype) are the result.
    L = 21 if backend == "triton" else 70
    run_case(attention_score_mse, attention_score_mse_reference, backend, make_inputs(3, 2, L, 16, 8, seed=18),
             dtype, grad_scale=1.0)


# CPU kernel row access (in place for one run of valid float32 rows with unit stride in D, else gathered).
(test_cpu_runs_of_valid_tokens, test_cpu_mixed_in_place_and_gathered_inputs, test_cpu_runs_with_16_bit_inputs,
 test_cpu_isa_paths_in_place) = cpu_row_access_tests(attention_score_mse, attention_score_mse_reference)
