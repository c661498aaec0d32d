import pytest
import torch

import kdfast
from kdfast import cpu_isa
from kdfast.ops import attention_kl, attention_kl_reference
from kdfast.ops.attention_kl import _fwd, _fwd_shared
from tests.ops.attention_cases import (BACKENDS, cpu_row_access_tests, isa_list, layout_inputs, make_inputs,
                                     run_case, run_double_backward)


def _shape(backend):
    # The Triton interpreter is slow: smaller L there (still not a multiple of the block).
    return (4, 2, 37 if backend == "triton" else 97, 16, 24)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_matches_oracle(backend, dtype):
    run_case(attention_kl, attention_kl_reference, backend, make_inputs(*_shape(backend)), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_value_relation_same_tensor(backend):
    # MiniLM value relation: attention_kl(v, v, v_t, v_t); the gradient of v sums both paths.
    run_case(attention_kl, attention_kl_reference, backend, make_inputs(3, 2, 29, 8, 32, seed=3), torch.float32,
             value=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_length_one(backend):
    inputs = make_inputs(2, 3, 1, 16, 16, lengths=[1, 0])
    out = run_case(attention_kl, attention_kl_reference, backend, inputs, torch.float32)
    assert abs(out.item()) < 1e-6  # one key: both distributions are 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16(backend):
    run_case(attention_kl, attention_kl_reference, backend, make_inputs(2, 2, 33, 16, 16, scale=1.5, seed=5),
             torch.float16)


@pytest.mark.cpu
@pytest.mark.parametrize("isa", isa_list())
def test_cpu_isa_paths(isa):
    with cpu_isa.use_cpu_isa(isa):
        run_case(attention_kl, attention_kl_reference, "cpu", make_inputs(3, 2, 70, 16, 8, seed=7), torch.float32)


@pytest.mark.cpu
def test_long_rows_cpu():
    # Several query tiles (64 rows) and keys beyond one tile.
    run_case(attention_kl, attention_kl_reference, "cpu", make_inputs(2, 2, 200, 16, 16, seed=9, lengths=[200, 131]),
             torch.float32)


def test_all_padding_gives_zero():
    q_s, k_s, q_t, k_t, _ = make_inputs(2, 2, 5, 4, 4)
    q_s = q_s.float().requires_grad_()
    out = attention_kl(q_s, k_s.float(), q_t.float(), k_t.float(), torch.zeros(2, 5))
    out.backward()
    assert out.item() == 0.0 and torch.all(q_s.grad == 0)


def test_teacher_gets_no_gradient_and_mask_optional():
    q_s, k_s, q_t, k_t, _ = make_inputs(2, 2, 6, 4, 4)
    q_s, k_s, q_t = (x.float().requires_grad_() for x in (q_s, k_s, q_t))
    out = attention_kl(q_s, k_s, q_t, k_t.float())
    out.backward()
    assert q_t.grad is None and q_s.grad is not None
    ref = attention_kl_reference(q_s.double(), k_s.double(), q_t.double(), k_t.double())
    assert abs(out.item() - ref.item()) < 1e-4 * max(1, abs(ref.item()))


def test_scales_are_used():
    q_s, k_s, q_t, k_t, mask = (x.float() if x.is_floating_point() else x for x in make_inputs(2, 2, 9, 4, 8))
    a = attention_kl(q_s, k_s, q_t, k_t, mask, scale_s=0.3, scale_t=0.05)
    b = attention_kl_reference(q_s.double(), k_s.double(), q_t.double(), k_t.double(), mask, scale_s=0.3,
                               scale_t=0.05)
    assert abs(a.item() - b.item()) < 1e-4 * max(1, b.item())


def test_bad_inputs():
    x = torch.randn(2, 4, 5, 8)
    with pytest.raises(ValueError, match="same number of heads"):
        attention_kl(x, x, torch.randn(2, 3, 5, 8), torch.randn(2, 3, 5, 8))
    with pytest.raises(ValueError, match="mask must be"):
        attention_kl(x, x, x, x, torch.ones(2, 6))
    with pytest.raises(ValueError, match="k_s must have the shape"):
        attention_kl(x, torch.randn(2, 4, 5, 4), x, x)
    with pytest.raises(ValueError, match="q_s must be 4-D"):
        attention_kl(x[0], x[0], x, x)
    with pytest.raises(TypeError, match="q_t must have dtype"):
        attention_kl(x, x, x.long(), x)
    with pytest.raises(ValueError, match="scale_s must be a positive"):
        attention_kl(x, x, x, x, scale_s=-1.0)
    with pytest.raises(ValueError, match="q_t must be"):
        attention_kl(x, x, torch.randn(2, 4, 6, 8), torch.randn(2, 4, 6, 8))


def test_float64_runs_on_reference():
    q_s, k_s, q_t, k_t, mask = make_inputs(2, 2, 5, 4, 4)
    assert kdfast.explain("attention_kl", q_s, k_s, q_t, k_t).backend == "reference"


@pytest.mark.parametrize("backend", [pytest.param("reference"), pytest.param("cpu", marks=pytest.mark.cpu)])
def test_opcheck(backend):
    q_s, k_s, q_t, k_t, mask = (x.float().contiguous() for x in make_inputs(2, 2, 7, 4, 8))
    q_s.requires_grad_()
    k_s.requires_grad_()
    for grad in (True, False):
        torch.library.opcheck(_fwd, (q_s, k_s, q_t, k_t, mask, 0.5, 0.35, grad, None, backend))
        torch.library.opcheck(_fwd_shared, (q_s, q_t, k_t, mask, 0.5, 0.35, grad, None, backend))
    # Weighted gradients, in the inputs' dtype (schema, fake impl, dispatch). Without autograd: the
    # backward scales the op's gradient outputs in place, which only the public functions (which drop
    # those outputs) may let it do; their backward is checked against the oracle in the other tests.
    w = torch.rand(2, 2) + 0.5
    for dt in (torch.float32, torch.bfloat16):
        qb, kb = q_s.detach().to(dt), k_s.detach().to(dt)
        torch.library.opcheck(_fwd, (qb, kb, q_t, k_t, mask, 0.5, 0.35, True, w, backend))
        torch.library.opcheck(_fwd_shared, (qb, q_t, k_t, mask, 0.5, 0.35, True, w, backend))


def test_torch_compile_fullgraph():
    q_s, k_s, q_t, k_t, mask = (x.float() for x in make_inputs(2, 2, 7, 4, 8))
    q_s.requires_grad_()
    fn = torch.compile(lambda a, b, c, d, m: attention_kl(a, b, c, d, m), fullgraph=True, backend="aot_eager")
    out = fn(q_s, k_s, q_t, k_t, mask)
    out.backward()
    ref = attention_kl_reference(q_s.double(), k_s.double(), q_t.double(), k_t.double(), mask)
    assert abs(out.item() - ref.item()) < 1e-4 * max(1, ref.item())
    assert q_s.grad is not None and torch.isfinite(q_s.grad).all()


def test_torch_compile_value_relation():
    v, _, v_t, _, mask = (x.float() for x in make_inputs(2, 2, 7, 4, 8))
    v.requires_grad_()
    fn = torch.compile(lambda a, c, m: attention_kl(a, a, c, c, m), fullgraph=True, backend="aot_eager")
    out = fn(v, v_t, mask)
    out.backward()
    o = v.detach().double().requires_grad_()
    ref = attention_kl_reference(o, o, v_t.double(), v_t.double(), mask)
    ref.backward()
    assert abs(out.item() - ref.item()) < 1e-4 * max(1, ref.item())
    torch.testing.assert_close(v.grad.double(), o.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_second_backward_recomputes(backend, dtype):
    small = backend == "triton"  # the interpreter is slow
    inputs = make_inputs(3, 2, 13 if small else 45, 8, 16, seed=11)
    run_double_backward(attention_kl, attention_kl_reference, backend, inputs, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_value_relation_second_backward(backend):
    inputs = make_inputs(3, 2, 13 if backend == "triton" else 45, 8, 16, seed=12)
    run_double_backward(attention_kl, attention_kl_reference, backend, inputs, torch.float32, value=True)



@pytest.mark.parametrize("op", ["attention_kl", "attention_score_mse"])
def test_backward_allocates_no_zero_gradients(op):
    # The unit gradients come out of the forward; the backward must not get zero-filled [B, H, L, D]
    # gradients for the op's two non-differentiable outputs (autograd's default) nor allocate new ones.
    import kdfast.ops as ops
    q_s, k_s, q_t, k_t, mask = (x.float() if x.is_floating_point() else x for x in make_inputs(2, 2, 33, 8, 8))
    q_s.requires_grad_()
    k_s.requires_grad_()
    loss = getattr(ops, op)(q_s, k_s, q_t, k_t, mask)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        loss.backward()
    names = {e.key for e in prof.key_averages()}
    assert not names & {"aten::zeros", "aten::zeros_like", "aten::zero_"}, sorted(names)
    assert not names & {"aten::clone", "aten::add"}, sorted(names)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_value_relation_padded(backend, dtype):
    # One tensor as q_s and k_s (one gradient buffer on the CPU kernel), padded masks with a hole,
    # several query tiles on the CPU kernel.
    L = 29 if backend == "triton" else 150
    run_case(attention_kl, attention_kl_reference, backend, make_inputs(3, 2, L, 16, 8, seed=13), dtype, value=True)


def _big_allocations(fn, nbytes):
    """Number of ops that allocated at least nbytes themselves while fn ran (profiler memory)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return sum(1 for e in prof.events() if e.self_cpu_memory_usage >= nbytes)


@pytest.mark.cpu
def test_value_relation_one_gradient_buffer():
    # attention_kl(v, v, v_t, v_t) on the CPU kernel: one [B, H, L, D] float32 gradient buffer
    # over forward + backward, not a dq and a dk that autograd adds.
    B, H, L, D = 2, 3, 64, 16
    v, _, v_t, _, mask = (x.float() if x.is_floating_point() else x for x in make_inputs(B, H, L, D, D, seed=14))
    v = v.contiguous().requires_grad_()
    grad_bytes = B * H * L * D * 4
    with kdfast.use_backend("cpu"):
        assert _big_allocations(lambda: attention_kl(v, v, v_t, v_t, mask).backward(), grad_bytes) == 1
        # The count can fail: two different student tensors get two buffers.
        k = v.detach().clone().requires_grad_()
        assert _big_allocations(lambda: attention_kl(v, k, v_t, v_t, mask).backward(), grad_bytes) == 2
    v.grad = None
    with kdfast.use_backend("cpu"):
        attention_kl(v, v, v_t, v_t, mask).backward()
    o = v.detach().double().requires_grad_()
    attention_kl_reference(o, o, v_t.double(), v_t.double(), mask).backward()
    torch.testing.assert_close(v.grad.double(), o.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.cpu
def test_value_relation_views_of_one_tensor():
    # Two views of the same memory (not leaves) are treated as one tensor; the gradient reaching
    # the base still sums both roles.
    v, _, v_t, _, mask = (x.float() if x.is_floating_point() else x for x in make_inputs(2, 2, 21, 8, 8, seed=15))
    base = v.detach().permute(0, 2, 1, 3).contiguous().requires_grad_()  # [B, L, H, D]
    o = v.detach().double().requires_grad_()
    attention_kl_reference(o, o, v_t.double(), v_t.double(), mask).backward()
    with kdfast.use_backend("cpu"):
        attention_kl(base.transpose(1, 2), base.transpose(1, 2), v_t, v_t, mask).backward()
    torch.testing.assert_close(base.grad.transpose(1, 2).double(), o.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.cpu
@pytest.mark.parametrize("isa", isa_list())
def test_value_relation_several_tiles_cpu(isa):
    # n > ~400 valid rows: several query tiles accumulate into the one gradient buffer.
    with cpu_isa.use_cpu_isa(isa):
        run_case(attention_kl, attention_kl_reference, "cpu", make_inputs(2, 2, 600, 16, 8, seed=16,
                                                                          lengths=[600, 451]), torch.float32,
                 value=True)


@pytest.mark.cpu
@pytest.mark.parametrize("op", ["attention_kl", "attention_score_mse", "value_relation"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_gradients_written_in_input_dtype(op, dtype):
    # 16-bit students on the CPU: the forward's kernel writes each gradient of the mean in the input
    # dtype, one buffer per student tensor, and no float32 gradient-sized buffer ever exists (no unit
    # gradient, no copy). The backward allocates nothing that large: loss.backward() hands the buffers
    # over, grad_output 2.5 scales them in place.
    import kdfast.ops as ops
    B, H, L, D = 2, 3, 64, 16
    q_s, k_s, q_t, k_t, mask = (x.to(dtype) if x.is_floating_point() else x
                                for x in make_inputs(B, H, L, D, D, seed=17))
    q_s, k_s = q_s.contiguous().requires_grad_(), k_s.contiguous().requires_grad_()
    if op == "value_relation":
        fn, n_buffers = (lambda: attention_kl(q_s, q_s, q_t, q_t, mask)), 1
    else:
        fn, n_buffers = (lambda: getattr(ops, op)(q_s, k_s, q_t, k_t, mask)), 2
    low = B * H * L * D * 2
    with kdfast.use_backend("cpu"):
        assert _big_allocations(lambda: fn().backward(), low) == n_buffers
        for g in (1.0, 2.5):
            loss = fn()
            assert _big_allocations(lambda: loss.backward(torch.tensor(g)), low) == 0  # no recompute, no copy
        q_s.grad = k_s.grad = None
        assert _big_allocations(lambda: fn().backward(), 2 * low) == 0
        assert _big_allocations(lambda: fn().mul(2.5).backward(), 2 * low) == 0
    assert q_s.grad.dtype == dtype


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("value", [False, True], ids=["qk", "value"])
def test_low_precision_grad_output_one(backend, dtype, value):
    # grad_output 1: on the CPU the gradients the forward wrote are the result as they are (other tests
    # use 2.5, which scales them in place); within the numerics rule of the float64 oracle either way.
    L = 21 if backend == "triton" else 70
    run_case(attention_kl, attention_kl_reference, backend, make_inputs(3, 2, L, 16, 8, seed=18), dtype,
             grad_scale=1.0, value=value)


def test_torch_compile_bf16():
    # Under torch.compile 16-bit students get their gradient from the backward (no hand-over check
    # on traced values); it equals the eager one.
    q_s, k_s, q_t, k_t, mask = (x.bfloat16() if x.is_floating_point() else x for x in make_inputs(2, 2, 9, 4, 8))
    grads = []
    for fn in (lambda *a: attention_kl(*a),
               torch.compile(lambda *a: attention_kl(*a), fullgraph=True, backend="aot_eager")):
        a, b = q_s.detach().requires_grad_(), k_s.detach().requires_grad_()
        fn(a, b, q_t, k_t, mask).backward()
        assert a.grad.dtype == torch.bfloat16
        grads.append((a.grad, b.grad))
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize("backend", [pytest.param("reference"), pytest.param("cpu", marks=pytest.mark.cpu)])
def test_weighted_op_backward_per_head(backend):
    # The op called directly with per-head weights in the forward and another per-head grad_output:
    # the gradients it returns are rescaled head by head (in bf16, in place) to grad_output's weights.
    q_s, k_s, q_t, k_t, mask = make_inputs(2, 3, 20, 8, 8, seed=19)
    m = (mask != 0).float()
    w = torch.rand(2, 3, generator=torch.Generator().manual_seed(1)) + 0.5
    g = torch.randn(2, 3, generator=torch.Generator().manual_seed(2))
    qb, kb = q_s.bfloat16().requires_grad_(), k_s.bfloat16().requires_grad_()
    loss_bh, _, _ = _fwd(qb, kb, q_t.bfloat16(), k_t.bfloat16(), m, 0.3, 0.4, True, w, backend)
    got = torch.autograd.grad(loss_bh, (qb, kb), grad_outputs=g)
    # Oracle: per-head sums of row KLs from the materialising float64 reference on one-head slices.
    q64, k64 = qb.detach().double().requires_grad_(), kb.detach().double().requires_grad_()
    qt64, kt64 = q_t.bfloat16().double(), k_t.bfloat16().double()
    total = 0
    for b in range(2):
        for h in range(3):
            s = slice(b, b + 1), slice(h, h + 1)
            mean = attention_kl_reference(q64[s], k64[s], qt64[s], kt64[s], m[b:b + 1], scale_s=0.3, scale_t=0.4)
            total = total + g[b, h].double() * mean * m[b].sum().double()
    want = torch.autograd.grad(total, (q64, k64))
    for a, b in zip(got, want):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.double(), b, rtol=2e-2, atol=2e-2 * b.abs().max().item())


# CPU kernel row access (in place for one run of valid float32 rows with unit stride in D, else gathered).
(test_cpu_runs_of_valid_tokens, test_cpu_mixed_in_place_and_gathered_inputs, test_cpu_runs_with_16_bit_inputs,
 test_cpu_isa_paths_in_place) = cpu_row_access_tests(attention_kl, attention_kl_reference)


@pytest.mark.cpu
@pytest.mark.parametrize("isa", isa_list())
def test_cpu_several_row_tiles(isa):
    # 700 valid keys: tiles of 224 query rows, the last one partial; left padding on example 1.
    with cpu_isa.use_cpu_isa(isa):
        run_case(attention_kl, attention_kl_reference, "cpu",
                 layout_inputs(2, 1, 720, 8, 8, "blhd", [(10, 710), (0, 655)], seed=4), torch.float32)


@pytest.mark.cpu
def test_cpu_more_threads_than_tasks():
    # One (b, h) task: the scheduler must not hand out work twice or skip the zero rows.
    q_s, k_s, q_t, k_t, mask = layout_inputs(1, 1, 9, 4, 4, "contiguous", [(2, 7)], seed=6)
    run_case(attention_kl, attention_kl_reference, "cpu", (q_s, k_s, q_t, k_t, mask), torch.float32)
