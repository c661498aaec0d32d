import pytest
import torch

import kdfast
from kdfast.ops import hidden_cosine, hidden_cosine_reference, hidden_mse, hidden_mse_reference
from kdfast.ops.hidden_mse import _fwd
from tests.numerics import assert_close_to_oracle

BACKENDS = [pytest.param("reference"), pytest.param("cpu", marks=pytest.mark.cpu),
            pytest.param("triton", marks=pytest.mark.triton)]
FNS = {"mse": hidden_mse, "cosine": hidden_cosine}
REFERENCES = {"mse": hidden_mse_reference, "cosine": hidden_cosine_reference}


def _inputs(B=3, L=97, Ds=48, Dt=80, seed=0, proj=True, bias=True):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(B, L, Ds, generator=g, dtype=torch.float64) * 10
    ht = torch.randn(B, L, Dt, generator=g, dtype=torch.float64) * 10
    W = torch.randn(Dt, Ds, generator=g, dtype=torch.float64) / Ds ** 0.5 if proj else None
    b = torch.randn(Dt, generator=g, dtype=torch.float64) if bias else None
    mask = torch.ones(B, L, dtype=torch.int64)
    for i, n in enumerate([L, L // 3, 0][:B]):
        mask[i, n:] = 0
    return hs, ht, W, b, mask


def _check(kind, backend, dtype, hs, ht, W, b, mask, gscale=1.7):
    names = ["student_hidden", "proj_weight", "proj_bias"]
    params = [hs, W, b]

    def run(cast, fn):
        leaves = [None if p is None else cast(p).detach().requires_grad_() for p in params]
        out = fn(leaves[0], cast(ht), leaves[1], leaves[2], mask)
        (gscale * out).backward()
        return out, leaves

    oracle, o_leaves = run(lambda x: x.to(dtype).double(), REFERENCES[kind])
    tref, r_leaves = run(lambda x: x.to(dtype), REFERENCES[kind])
    with kdfast.use_backend(backend):
        out, leaves = run(lambda x: x.to(dtype), FNS[kind])
    assert out.dtype == torch.float32
    assert_close_to_oracle(out.detach().reshape(1), oracle.detach().reshape(1), tref.detach().float().reshape(1),
                           dtype, what=f"{kind} loss")
    for n, a, o, r in zip(names, leaves, o_leaves, r_leaves):
        if a is None:
            continue
        assert a.grad.dtype == dtype
        assert_close_to_oracle(a.grad.float(), o.grad, r.grad.float(), dtype, what=f"{kind} grad {n}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["mse", "cosine"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_projected_matches_oracle(backend, kind, dtype):
    _check(kind, backend, dtype, *_inputs())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_no_projection_and_noncontiguous(backend, kind):
    hs, ht, _, _, mask = _inputs(B=2, L=300, Ds=40, Dt=40, seed=1, proj=False, bias=False)
    # [L, B, D] storage viewed as [B, L, D]; 300 rows: several row blocks.
    hs = hs.transpose(0, 1).contiguous().transpose(0, 1)
    _check(kind, backend, torch.float32, hs, ht, None, None, mask)


@pytest.mark.parametrize("backend", BACKENDS)
def test_weight_without_bias_fp16(backend):
    hs, ht, W, _, mask = _inputs(B=2, L=33, Ds=16, Dt=24, seed=2, bias=False)
    _check("mse", backend, torch.float16, hs / 10, ht / 10, W, None, mask)


def test_no_mask_equals_mse_loss():
    hs, ht, W, b, _ = (x.float() if isinstance(x, torch.Tensor) else x for x in _inputs(B=2, L=5, Ds=4, Dt=6))
    ref = torch.nn.functional.mse_loss(torch.nn.functional.linear(hs, W, b), ht)
    assert torch.allclose(hidden_mse(hs, ht, W, b), ref, rtol=1e-5)
    cos = (1 - torch.nn.functional.cosine_similarity(torch.nn.functional.linear(hs, W, b), ht, dim=-1)).mean()
    assert torch.allclose(hidden_cosine(hs, ht, W, b), cos, rtol=1e-5)


def test_all_masked_gives_zero():
    hs, ht = torch.randn(2, 3, 4, requires_grad=True), torch.randn(2, 3, 4)
    out = hidden_mse(hs, ht, mask=torch.zeros(2, 3))
    out.backward()
    assert out.item() == 0.0 and torch.all(hs.grad == 0)


def test_bad_inputs():
    hs, ht = torch.randn(2, 3, 4), torch.randn(2, 3, 6)
    with pytest.raises(ValueError, match="pass proj_weight"):
        hidden_mse(hs, ht)
    with pytest.raises(ValueError, match="proj_weight must be"):
        hidden_mse(hs, ht, torch.randn(4, 6))
    with pytest.raises(ValueError, match="proj_bias must be"):
        hidden_mse(hs, ht, torch.randn(6, 4), torch.randn(4))
    with pytest.raises(ValueError, match="mask must have the leading shape"):
        hidden_mse(hs, ht, torch.randn(6, 4), mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="agree in all but the last"):
        hidden_mse(hs, torch.randn(2, 4, 6), torch.randn(6, 4))
    with pytest.raises(ValueError, match="eps must be"):
        hidden_cosine(hs, hs, eps=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    hs, ht, W, b, mask = (x.float() for x in _inputs(B=2, L=7, Ds=4, Dt=6))
    hs = hs.reshape(-1, 4).requires_grad_()  # leaves: the op is called as the public function calls it
    ht = ht.reshape(-1, 6)
    W.requires_grad_()
    b.requires_grad_()
    m = mask.reshape(-1).float()
    w = torch.tensor(0.37)
    hb = hs.detach().bfloat16()
    for kind in (0, 1):
        for grad in (True, False):
            torch.library.opcheck(_fwd, (hs, ht, W, b, m, kind, 1e-8, grad, None, backend))
        torch.library.opcheck(_fwd, (hs, ht[:, :4].contiguous(), None, None, m, kind, 1e-8, True, None, backend))
        # Weighted gradients, each in its input's dtype (bf16 h_s, float32 W and b), without autograd
        # (see test_attention_kl.test_opcheck).
        torch.library.opcheck(_fwd, (hs.detach(), ht, W.detach(), b.detach(), m, kind, 1e-8, True, w, backend))
        torch.library.opcheck(_fwd, (hb, ht, W.detach(), b.detach(), m, kind, 1e-8, True, w, backend))


def test_torch_compile_fullgraph():
    hs, ht, W, b, mask = (x.float() for x in _inputs(B=2, L=7, Ds=4, Dt=6))
    W.requires_grad_()
    fn = torch.compile(lambda *a: hidden_mse(*a), fullgraph=True, backend="aot_eager")
    out = fn(hs, ht, W, b, mask)
    out.backward()
    ref = hidden_mse_reference(hs.double(), ht.double(), W.double(), b.double(), mask)
    assert abs(out.item() - ref.item()) < 1e-4 * ref.item()
    assert W.grad is not None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_second_backward_recomputes(backend, kind):
    # retain_graph=True: the first backward scales the gradients the forward wrote, the second
    # reruns the forward kernel; grad_output != 1 both times, each vs the float64 oracle.
    small = backend == "triton"
    hs, ht, W, b, mask = _inputs(B=3, L=13 if small else 41, Ds=24, Dt=40, seed=4)
    params = [hs, W, b]
    o_leaves = [p.double().detach().requires_grad_() for p in params]
    o_grads = torch.autograd.grad(REFERENCES[kind](o_leaves[0], ht, o_leaves[1], o_leaves[2], mask),
                                  o_leaves)
    r_leaves = [p.float().detach().requires_grad_() for p in params]
    r_grads = torch.autograd.grad(REFERENCES[kind](r_leaves[0], ht.float(), r_leaves[1], r_leaves[2], mask),
                                  r_leaves)
    leaves = [p.float().detach().requires_grad_() for p in params]
    with kdfast.use_backend(backend):
        out = FNS[kind](leaves[0], ht.float(), leaves[1], leaves[2], mask)
        for k, s in enumerate((1.7, -0.6)):
            got = torch.autograd.grad(out, leaves, grad_outputs=torch.tensor(s), retain_graph=k == 0)
            for n, a, o, r in zip(("h_s", "W", "b"), got, o_grads, r_grads):
                assert_close_to_oracle(a, s * o, s * r, torch.float32, what=f"{kind} backward {k + 1} grad {n}")
    # .backward() twice accumulates both.
    with kdfast.use_backend(backend):
        out = FNS[kind](leaves[0], ht.float(), leaves[1], leaves[2], mask)
        out.backward(retain_graph=True)
        out.backward()
    assert_close_to_oracle(leaves[0].grad, 2 * o_grads[0], 2 * r_grads[0], torch.float32, what="accumulated")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["mse", "cosine"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_grad_output_one(backend, kind, dtype):
    # grad_output 1: on the CPU the gradients the forward wrote (in the inputs' dtype) are the result;
    # the other tests use grad_output 1.7, which scales them in place.
    _check(kind, backend, dtype, *_inputs(B=3, L=37 if backend == "triton" else 97), gscale=1.0)


def _big_allocations(fn, nbytes):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return sum(1 for e in prof.events() if e.self_cpu_memory_usage >= nbytes)


@pytest.mark.cpu
@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_bf16_no_float32_copies(kind):
    # bf16 hidden states: the CPU kernel converts block by block and writes dh in bf16; no buffer of the
    # size of a float32 copy of h_s or h_t exists, and loss.backward() allocates nothing of dh's size.
    hs, ht, W, b, mask = (x.bfloat16() if x.is_floating_point() else x for x in _inputs(B=4, L=384, Ds=96, Dt=96))
    hs.requires_grad_()
    low = hs.numel() * 2
    with kdfast.use_backend("cpu"):
        fn = FNS[kind]
        assert _big_allocations(lambda: fn(hs, ht, W, b, mask).backward(), low) == 1  # dh, bf16
        hs.grad = None
        assert _big_allocations(lambda: fn(hs, ht, W, b, mask).mul(1.7).backward(), 2 * low) == 0
        for g in (1.0, 1.7):
            loss = fn(hs, ht, W, b, mask)
            assert _big_allocations(lambda: loss.backward(torch.tensor(g)), low) == 0
    assert hs.grad.dtype == torch.bfloat16
