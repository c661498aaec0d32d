"""kdfast.ops.attention: every backend vs the float64 reference, with padding,
head gates, active heads, block masks; gradients; opcheck; compile; errors."""
import math

import pytest
import torch
import torch.nn.functional as F

import kdfast
from kdfast import backends
from kdfast.ops import attention, attention_reference
from kdfast.ops.attention import _attn_fwd
from tests.numerics import assert_close_to_oracle


def make_qkv(B, H, L, D, dtype=torch.float32, seed=0, hf_layout=True, Lk=None):
    """q, k of scale ~2 (scores of scale ~10), v of scale 10; HF layout = [B, L, H, D] transposed views."""
    g = torch.Generator().manual_seed(seed)
    Lk = L if Lk is None else Lk

    def t(n, s):
        if hf_layout:
            return (torch.randn(B, n, H, D, generator=g) * s).to(dtype).transpose(1, 2)
        return (torch.randn(B, H, n, D, generator=g) * s).to(dtype)
    return t(L, 2.0), t(Lk, 2.0), t(Lk, 10.0)


def pad_mask(B, L, lengths=None):
    lengths = lengths or [L, max(1, L // 2), 3, L - 1, 0][:B]
    m = torch.zeros(B, L, dtype=torch.bool)
    for b, n in enumerate(lengths):
        m[b, :n] = True
    return m


def oracle(q, k, v, **kw):
    g = kw.get("head_gates")
    kw = dict(kw, head_gates=None if g is None else g.double())
    return attention_reference(q.double(), k.double(), v.double(), **kw)


def torch_same_dtype(q, k, v, mask=None, scale=None, **kw):
    """What a user would run instead: SDPA in the same dtype (plus gates / masks by hand)."""
    if kw:
        return attention_reference(q, k, v, mask=mask, scale=scale, **kw)
    am = None if mask is None else mask[:, None, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=am, scale=scale)
    if mask is not None:
        out = torch.where(mask.any(-1)[:, None, None, None], out, torch.zeros_like(out))
    return out


def _backend_params(triton=True):
    ps = [pytest.param("reference"), pytest.param("cpu", marks=pytest.mark.cpu)]
    if triton:  # under TRITON_INTERPRET=1 on machines without a GPU
        ps.append(pytest.param("triton", marks=pytest.mark.triton))
    return ps


CASES = {
    "plain": lambda B, H, L: {},
    "padding": lambda B, H, L: {"mask": pad_mask(B, L)},
    "gates": lambda B, H, L: {"mask": pad_mask(B, L), "head_gates": torch.rand(H) * 2},
    "gates_bh": lambda B, H, L: {"head_gates": torch.rand(B, H)},
    "active_bool": lambda B, H, L: {"mask": pad_mask(B, L), "active_heads": torch.arange(H) % 2 == 0},
    "active_idx": lambda B, H, L: {"active_heads": torch.tensor([H - 1, 0])},
    "blocks": lambda B, H, L: {"block_mask": torch.rand(B, H, -(-L // 16), -(-L // 16),
                                                       generator=torch.Generator().manual_seed(3)) > 0.4,
                               "block_size": 16},
    "blocks_pad_zpq": lambda B, H, L: {"mask": pad_mask(B, L), "zero_padded_queries": True,
                                       "block_mask": torch.rand(1, H, -(-L // 32), -(-L // 32),
                                                                generator=torch.Generator().manual_seed(4)) > 0.5,
                                       "block_size": 32},
    # Mask blocks larger than the Triton tile (32): several tiles read one mask entry.
    "blocks64": lambda B, H, L: {"mask": pad_mask(B, L),
                                 "block_mask": torch.rand(B, 1, -(-L // 64), -(-L // 64),
                                                          generator=torch.Generator().manual_seed(5)) > 0.3,
                                 "block_size": 64},
}


@pytest.mark.parametrize("backend", _backend_params())
@pytest.mark.parametrize("case", list(CASES))
def test_forward_matches_oracle(backend, case):
    B, H, L, D = 4, 3, 97, 40
    q, k, v = make_qkv(B, H, L, D, seed=hash(case) % 1000)
    kw = CASES[case](B, H, L)
    with kdfast.use_backend(backend):
        out = attention(q, k, v, **kw)
    assert out.shape == (B, H, L, D) and out.dtype == q.dtype
    ref = oracle(q, k, v, **kw)
    assert_close_to_oracle(out, ref, torch_same_dtype(q, k, v, **kw), torch.float32, what=case)


@pytest.mark.cpu
@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512", "avx512_vnni"])
def test_cpu_isa_paths(isa):
    from kdfast import cpu_isa
    if isa not in cpu_isa.available_isas():
        pytest.skip(f"{isa} not supported by this CPU")
    B, H, L, D = 3, 2, 70, 64
    q, k, v = make_qkv(B, H, L, D, seed=7)
    kw = {"mask": pad_mask(B, L), "head_gates": torch.rand(H),
          "block_mask": torch.tensor([[True, False, True], [True, True, False], [False, True, True]])[None, None],
          "block_size": 32}
    with cpu_isa.use_cpu_isa(isa), kdfast.use_backend("cpu"):
        out = attention(q, k, v, **kw)
    assert_close_to_oracle(out, oracle(q, k, v, **kw), torch_same_dtype(q, k, v, **kw), torch.float32, what=isa)


@pytest.mark.parametrize("backend", _backend_params())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(backend, dtype):
    B, H, L, D = 2, 2, 33, 32
    q, k, v = make_qkv(B, H, L, D, dtype=dtype, seed=11)
    m = pad_mask(B, L, [33, 20])
    with kdfast.use_backend(backend):
        out = attention(q, k, v, mask=m)
    assert out.dtype == dtype
    assert_close_to_oracle(out, oracle(q, k, v, mask=m), torch_same_dtype(q, k, v, mask=m), dtype)


@pytest.mark.parametrize("backend", _backend_params())
def test_edge_shapes(backend):
    with kdfast.use_backend(backend):
        for (B, H, L, D, Lk) in [(1, 1, 1, 8, 1), (2, 3, 5, 17, 130), (1, 2, 130, 16, 3)]:
            q, k, v = make_qkv(B, H, L, D, seed=L, hf_layout=False, Lk=Lk)
            m = pad_mask(B, Lk, [Lk, 1][:B])
            out = attention(q, k, v, mask=m, scale=0.3)
            ref = oracle(q, k, v, mask=m, scale=0.3)
            assert_close_to_oracle(out, ref, torch_same_dtype(q, k, v, mask=m, scale=0.3), torch.float32)


def test_fully_masked_rows_give_zero():
    q, k, v = make_qkv(2, 2, 9, 8)
    m = pad_mask(2, 9, [9, 0])
    out = attention(q, k, v, mask=m)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert torch.isfinite(out).all()


def test_zero_padded_queries_zeroes_rows():
    q, k, v = make_qkv(2, 2, 9, 8)
    m = pad_mask(2, 9, [9, 4])
    out = attention(q, k, v, mask=m, zero_padded_queries=True)
    full = attention(q, k, v, mask=m)
    assert torch.equal(out[1, :, 4:], torch.zeros_like(out[1, :, 4:]))
    torch.testing.assert_close(out[1, :, :4], full[1, :, :4])


@pytest.mark.parametrize("backend", _backend_params())
@pytest.mark.parametrize("case", ["padding", "gates", "gates_bh", "active_bool", "blocks_pad_zpq", "blocks64"])
def test_gradients_match_oracle(backend, case):
    _check_gradients(backend, case)


@pytest.mark.cpu
@pytest.mark.parametrize("examples", [1, 2])
@pytest.mark.parametrize("case", ["blocks", "blocks_pad_zpq", "blocks64"])
def test_cpu_backward_in_example_chunks(monkeypatch, examples, case):
    # The block-sparse CPU backward runs a few examples at a time (chunks of 1 and 2 of B=3 here:
    # uneven), with per-example and shared block masks; same gradients as the oracle. (Without a
    # block mask the compiled flash-style backward runs: see test_gradients_match_oracle.)
    import importlib
    att = importlib.import_module("kdfast.ops.attention")
    monkeypatch.setattr(att, "CPU_BWD_CHUNK_BYTES", examples * 2 * 37 * 37 * 4)
    calls = []
    ref = att._bwd_reference
    monkeypatch.setattr(att, "_bwd_reference", lambda *a: calls.append(a[1].shape[0]) or ref(*a))
    _check_gradients("cpu", case)
    assert calls == [examples] * (3 // examples) + ([3 % examples] if 3 % examples else [])


def _check_gradients(backend, case):
    B, H, L, D = 3, 2, 37, 24
    q, k, v = [x.detach().requires_grad_() for x in make_qkv(B, H, L, D, seed=5)]
    kw = CASES[case](B, H, L)
    gates = kw.get("head_gates")
    if gates is not None:
        gates = gates.clone().requires_grad_()
        kw["head_gates"] = gates
    with kdfast.use_backend(backend):
        out = attention(q, k, v, **kw)
    go = torch.randn_like(out) * 3
    inputs = [q, k, v] + ([gates] if gates is not None else [])
    got = torch.autograd.grad(out, inputs, go)
    q64, k64, v64 = [x.detach().double().requires_grad_() for x in (q, k, v)]
    kw64 = dict(kw)
    ins64 = [q64, k64, v64]
    if gates is not None:
        kw64["head_gates"] = gates.detach().double().requires_grad_()
        ins64.append(kw64["head_gates"])
    want = torch.autograd.grad(attention_reference(q64, k64, v64, **kw64), ins64, go.double())
    kw32 = dict(kw)
    ins32 = [x.detach().requires_grad_() for x in inputs]
    if gates is not None:
        kw32["head_gates"] = ins32[3]
    tref = torch.autograd.grad(attention_reference(*ins32[:3], **kw32), ins32, go)
    for name, a, b, c in zip("qkvg", got, want, tref):
        assert_close_to_oracle(a, b, c, torch.float32, what=f"grad {name}")


def test_dropout_runs_reference_with_grad():
    q, k, v = [x.detach().requires_grad_() for x in make_qkv(2, 2, 16, 8)]
    torch.manual_seed(0)
    out = attention(q, k, v, dropout_p=0.5)
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()
    assert not torch.allclose(out, attention(q, k, v))


def test_dropout_is_the_reference_with_the_kernel_mask_and_gates():
    # With dropout the op is the reference given the kernels' mask (drawn from the seed / offset the
    # op takes from torch's generator), times the head gates.
    from kdfast.ops.attention import attention_dropout_mask, draw_dropout_rng
    q, k, v = make_qkv(3, 4, 29, 16, seed=5)
    m = pad_mask(3, 29, [29, 11, 5])
    gates = torch.tensor([1.0, 0.3, 0.0, 0.8])
    torch.manual_seed(1)
    got = attention(q, k, v, mask=m, head_gates=gates, dropout_p=0.25)
    torch.manual_seed(1)
    keep = attention_dropout_mask(draw_dropout_rng(), 3, 4, 29, 29, 0.25)
    want = attention_reference(q, k, v, mask=m, head_gates=gates, dropout_p=0.25, dropout_mask=keep)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4)
    # zero_padded_queries: the padded query rows are 0, the others unchanged
    torch.manual_seed(1)
    zq = attention(q, k, v, mask=m, head_gates=gates, dropout_p=0.25, zero_padded_queries=True)
    assert torch.equal(zq[~m[:, None, :].expand(3, 4, 29)], torch.zeros_like(zq[~m[:, None, :].expand(3, 4, 29)]))
    assert torch.allclose(zq[m[:, None, :].expand(3, 4, 29)], got[m[:, None, :].expand(3, 4, 29)])


def test_dropout_keyless_rows_inactive_heads_and_grads():
    q, k, v = [x.detach().requires_grad_() for x in make_qkv(2, 3, 13, 8, seed=6)]
    m = pad_mask(2, 13, [13, 0])  # the second example has no key at all
    gates = torch.tensor([[1.0, 0.5, 2.0], [1.0, 1.0, 1.0]], requires_grad=True)
    torch.manual_seed(2)
    out = attention(q, k, v, mask=m, head_gates=gates, active_heads=torch.tensor([0, 2]), dropout_p=0.1)
    assert out.shape == (2, 3, 13, 8)
    assert (out[1] == 0).all() and (out[:, 1] == 0).all()  # key-less example, inactive head
    (out * torch.randn_like(out)).sum().backward()
    for x in (q, k, v, gates):
        assert torch.isfinite(x.grad).all()
    assert (q.grad[1] == 0).all() and (q.grad[:, 1] == 0).all() and (gates.grad[:, 1] == 0).all()
    assert q.grad[0, 0].abs().sum() > 0 and gates.grad[0, 2] != 0


def test_dropout_averages_to_the_no_dropout_output():
    # Inverted dropout is unbiased: the mean over many draws approaches the plain output.
    q, k, v = make_qkv(1, 2, 8, 4, seed=7)
    m = pad_mask(1, 8, [6])
    plain = attention(q, k, v, mask=m)
    torch.manual_seed(3)
    mean = torch.stack([attention(q, k, v, mask=m, dropout_p=0.3) for _ in range(4000)]).mean(0)
    assert torch.allclose(mean, plain, atol=0.06 * plain.abs().max().item())


@pytest.mark.parametrize("backend", _backend_params())
def test_opcheck(backend):
    q, k, v = [x.contiguous() for x in make_qkv(2, 2, 19, 8, seed=2)]
    q.requires_grad_()
    m = pad_mask(2, 19, [19, 7])
    gates = torch.rand(2, requires_grad=True)
    bm = torch.tensor([[True, False], [True, True]])[None, None]
    args = (q, k, v, m, gates, None, bm, 16, 0.25, False, True, 0.0, None, backend)
    torch.library.opcheck(_attn_fwd, args)
    if backend != "triton":  # dropout (no block mask) through the kernels' RNG
        rng = torch.tensor([12345, 678], dtype=torch.int64)
        torch.library.opcheck(_attn_fwd, (q, k, v, m, gates, None, None, 16, 0.25, True, True, 0.2, rng, backend))


def test_torch_compile_fullgraph():
    q, k, v = make_qkv(2, 2, 19, 8, seed=2)
    m = pad_mask(2, 19, [19, 7])
    gates = torch.rand(2)
    fn = torch.compile(lambda q, k, v: attention(q, k, v, mask=m, head_gates=gates), fullgraph=True,
                       backend="aot_eager")
    torch.testing.assert_close(fn(q, k, v), attention(q, k, v, mask=m, head_gates=gates))


def test_explain_names_backends():
    q, k, v = make_qkv(1, 1, 4, 8)
    ch = backends.explain("attention", q.double(), k.double(), v.double(), None, None, None, None, 64, 1.0, False)
    assert ch.backend == "reference" and "dtype" in ch.rejected["cpu"] + ch.rejected.get("triton", "dtype")


@pytest.mark.parametrize("bad, err", [
    (dict(q=torch.zeros(2, 3, 4)), "q must be 4-D"),
    (dict(k=torch.zeros(2, 3, 5, 9)), "k must be"),
    (dict(mask=torch.ones(2, 4)), "mask must be a bool/integer"),
    (dict(mask=torch.ones(3, 5, dtype=torch.bool)), "mask must be a bool/integer"),
    (dict(head_gates=torch.ones(4)), "head_gates must be"),
    (dict(active_heads=torch.ones(4, dtype=torch.bool)), "active_heads as a bool mask"),
    (dict(block_mask=torch.ones(1, 1, 2, 2, dtype=torch.bool)), "block_mask must be"),
    (dict(block_size=0), "block_size must be"),
    (dict(scale=-1.0), "scale must be"),
    (dict(dropout_p=1.0), "dropout_p must be"),
    (dict(q=torch.zeros(2, 3, 4, 8, dtype=torch.int32)), "q must have dtype"),
])
def test_bad_inputs(bad, err):
    args = dict(q=torch.zeros(2, 3, 4, 8), k=torch.zeros(2, 3, 5, 8), v=torch.zeros(2, 3, 5, 8))
    args.update(bad)
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    with pytest.raises((ValueError, TypeError), match=err):
        attention(q, k, v, **args)


# --------------------------------------------------------------------------
# Dropout inside the kernels (counter-based RNG), the compiled backward
# --------------------------------------------------------------------------
def _dropout_case(B=3, H=2, L=37, D=24, seed=9):
    q, k, v = [x.detach().requires_grad_() for x in make_qkv(B, H, L, D, seed=seed)]
    m = pad_mask(B, L, [L, 17, 0][:B])  # odd lengths, one fully padded example
    return q, k, v, m


@pytest.mark.parametrize("backend", _backend_params(triton=False))
@pytest.mark.parametrize("extra", ["plain", "gates_bh", "zpq_active"])
def test_dropout_grads_match_oracle_with_the_kernel_mask(backend, extra):
    from kdfast.ops.attention import attention_dropout_mask, draw_dropout_rng
    q, k, v, m = _dropout_case()
    B, H, L, _ = q.shape
    kw = {"mask": m}
    if extra == "gates_bh":
        kw["head_gates"] = (torch.rand(B, H) * 2).requires_grad_()
    if extra == "zpq_active":
        kw.update(zero_padded_queries=True, active_heads=torch.tensor([True, False]))
    p = 0.3
    torch.manual_seed(4)
    with kdfast.use_backend(backend):
        out = attention(q, k, v, dropout_p=p, **kw)
    torch.manual_seed(4)
    keep = attention_dropout_mask(draw_dropout_rng(), B, H, L, L, p)
    ins = [q, k, v] + ([kw["head_gates"]] if "head_gates" in kw else [])
    go = torch.randn_like(out) * 3
    got = torch.autograd.grad(out, ins, go)
    ins64 = [x.detach().double().requires_grad_() for x in ins]
    kw64 = dict(kw, head_gates=ins64[3]) if "head_gates" in kw else dict(kw)
    ref64 = attention_reference(*ins64[:3], dropout_p=p, dropout_mask=keep, **kw64)
    want = torch.autograd.grad(ref64, ins64, go.double())
    ins32 = [x.detach().requires_grad_() for x in ins]
    kw32 = dict(kw, head_gates=ins32[3]) if "head_gates" in kw else dict(kw)
    ref32 = attention_reference(*ins32[:3], dropout_p=p, dropout_mask=keep, **kw32)
    tref = torch.autograd.grad(ref32, ins32, go)
    assert_close_to_oracle(out, ref64, ref32, torch.float32, what="out")
    for name, a, b, c in zip("qkvg", got, want, tref):
        assert_close_to_oracle(a, b, c, torch.float32, what=f"grad {name}")


def test_dropout_mask_kernel_equals_torch_philox_and_statistics():
    from kdfast.ops.attention import attention_dropout_mask, dropout_keep_reference
    rng = torch.tensor([0x1234_5678_9ABC_DEF, (1 << 33) + 5], dtype=torch.int64)
    keep = attention_dropout_mask(rng, 2, 3, 40, 50, 0.1)
    assert torch.equal(keep, dropout_keep_reference(rng, 2, 3, 40, 50, 0.1))
    rate = keep.float().mean().item()
    assert abs(rate - 0.9) < 4 * math.sqrt(0.09 / keep.numel())
    other = attention_dropout_mask(rng + torch.tensor([0, 7]), 2, 3, 40, 50, 0.1)  # another offset
    agree = (keep == other).float().mean().item()  # independent masks agree with prob 0.82
    assert abs(agree - 0.82) < 0.02
    assert not torch.equal(keep, attention_dropout_mask(rng + torch.tensor([1, 0]), 2, 3, 40, 50, 0.1))


def test_dropout_same_seed_same_output_and_grads():
    q, k, v, m = _dropout_case()
    res = []
    for _ in range(2):
        torch.manual_seed(11)
        out = attention(q, k, v, mask=m, dropout_p=0.2)
        res.append((out,) + torch.autograd.grad(out.square().sum(), (q, k, v)))
    for a, b in zip(*res):
        assert torch.equal(a, b)
    out3 = attention(q, k, v, mask=m, dropout_p=0.2)  # next draw: another mask
    assert not torch.equal(out3, res[0][0])


@pytest.mark.cpu
@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512", "avx512_vnni"])
def test_dropout_kernel_isa_paths(isa):
    from kdfast import cpu_isa
    if isa not in cpu_isa.available_isas():
        pytest.skip(f"{isa} not supported by this CPU")
    q, k, v, m = _dropout_case(B=2, L=29, D=64)
    res = {}
    for name, path in (("cpu", isa), ("reference", None)):
        torch.manual_seed(5)
        with kdfast.use_backend(name), (cpu_isa.use_cpu_isa(path) if path else _nullctx()):
            out = attention(q, k, v, mask=m, dropout_p=0.15)
            res[name] = (out,) + torch.autograd.grad(out.sum(), (q, k, v))
    for a, b in zip(res["cpu"], res["reference"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())


def _nullctx():
    import contextlib
    return contextlib.nullcontext()


@pytest.mark.cpu
def test_bf16_forward_backward_with_dropout():
    q, k, v, m = _dropout_case(B=2, L=33, D=32)
    qb, kb, vb = [x.detach().bfloat16().requires_grad_() for x in (q, k, v)]
    torch.manual_seed(3)
    with kdfast.use_backend("cpu"):
        out = attention(qb, kb, vb, mask=m, dropout_p=0.1)
        g = torch.autograd.grad(out.float().sum(), (qb, kb, vb))
    assert out.dtype == torch.bfloat16 and all(x.dtype == torch.bfloat16 for x in g)
    torch.manual_seed(3)
    with kdfast.use_backend("reference"):
        ref = attention(qb.detach().float().requires_grad_(), kb.detach().float(), vb.detach().float(), mask=m,
                        dropout_p=0.1)
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())


def test_torch_compile_fullgraph_with_dropout():
    q, k, v, m = _dropout_case(B=2, L=19, D=8)
    fn = torch.compile(lambda q, k, v: attention(q, k, v, mask=m, dropout_p=0.2), fullgraph=True,
                       backend="aot_eager")
    torch.manual_seed(8)
    a = fn(q, k, v)
    torch.manual_seed(8)
    b = fn(q, k, v)
    assert torch.equal(a, b)
    a.sum().backward()
    assert torch.isfinite(q.grad).all()


# --------------------------------------------------------------------------
# Packed variable-length input
# --------------------------------------------------------------------------
def _packed_case(B=3, H=2, L=23, D=16, lengths=(23, 9, 0)):
    q, k, v = make_qkv(B, H, L, D, seed=13)
    m = pad_mask(B, L, list(lengths))
    lens = m.sum(1)
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), lens.cumsum(0)]).to(torch.int32)
    idx = m.reshape(-1).nonzero().squeeze(1)

    def pack(x):
        return x.transpose(1, 2).reshape(B * L, H, D)[idx].detach().requires_grad_()
    return (q, k, v), m, cu, idx, tuple(pack(x) for x in (q, k, v))


@pytest.mark.parametrize("backend", _backend_params())
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_varlen_equals_padded_forward_and_backward(backend, p):
    # triton: the packed kernels against the padded Triton kernels (same dropout mask for one seed)
    from kdfast.ops.attention import attention_varlen
    (q, k, v), m, cu, idx, (qp, kp, vp) = _packed_case()
    B, H, L, D = q.shape
    g = torch.rand(B, H, requires_grad=True)
    qq, kk, vv = [x.detach().requires_grad_() for x in (q, k, v)]
    with kdfast.use_backend(backend):
        torch.manual_seed(2)
        out = attention_varlen(qp, kp, vp, cu, cu, L, L, head_gates=g, dropout_p=p)
        torch.manual_seed(2)
        pad = attention(qq, kk, vv, mask=m, head_gates=g, zero_padded_queries=True, dropout_p=p)
    unpack = lambda x: x.transpose(1, 2).reshape(B * L, H, D)[idx]  # noqa: E731
    assert out.shape == qp.shape
    torch.testing.assert_close(out, unpack(pad), rtol=1e-5, atol=1e-5)
    go = torch.randn_like(out)
    gfull = torch.zeros(B * L, H, D)
    gfull[idx] = go
    a = torch.autograd.grad(out, (qp, kp, vp, g), go)
    b = torch.autograd.grad(pad, (qq, kk, vv, g), gfull.view(B, L, H, D).transpose(1, 2))
    for x, y in zip(a[:3], b[:3]):
        torch.testing.assert_close(x, unpack(y), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a[3], b[3], rtol=1e-5, atol=1e-5)


@pytest.mark.cpu
def test_varlen_cpu_matches_reference_and_opcheck():
    from kdfast.ops.attention import _varlen_fwd, attention_varlen
    (q, k, v), m, cu, idx, (qp, kp, vp) = _packed_case(lengths=(23, 1, 14))
    L = q.shape[2]
    res = {}
    for be in ("cpu", "reference"):
        with kdfast.use_backend(be):
            torch.manual_seed(6)
            o = attention_varlen(qp, kp, vp, cu, cu, L, L, dropout_p=0.1)
            res[be] = (o,) + torch.autograd.grad(o.square().sum(), (qp, kp, vp))
    for a, b in zip(res["cpu"], res["reference"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())
    rng = torch.tensor([99, 5], dtype=torch.int64)
    gates = torch.rand(2, requires_grad=True)
    torch.library.opcheck(_varlen_fwd, (qp.detach().requires_grad_(), kp.detach(), vp.detach(), cu.long(), cu.long(),
                                        L, L, gates, None, 0.25, True, 0.2, rng, "cpu"))


@pytest.mark.triton
def test_triton_dropout_uses_the_same_mask():
    # tl.rand with the kernels' (seed, offset) counters: the Triton output and gradients are the
    # reference's with attention_dropout_mask (tiny shapes: interpreter).
    from kdfast.ops.attention import attention_dropout_mask, draw_dropout_rng
    q, k, v = [x.detach().requires_grad_() for x in make_qkv(2, 2, 11, 16, seed=21)]
    m = pad_mask(2, 11, [11, 6])
    torch.manual_seed(9)
    with kdfast.use_backend("triton"):
        out = attention(q, k, v, mask=m, dropout_p=0.3)
    torch.manual_seed(9)
    keep = attention_dropout_mask(draw_dropout_rng(), 2, 2, 11, 11, 0.3)
    q64, k64, v64 = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref = attention_reference(q64, k64, v64, mask=m, dropout_p=0.3, dropout_mask=keep)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)
    go = torch.randn_like(out)
    a = torch.autograd.grad(out, (q, k, v), go)
    b = torch.autograd.grad(ref, (q64, k64, v64), go.double())
    for x, y in zip(a, b):
        torch.testing.assert_close(x.double(), y, rtol=1e-3, atol=1e-3 * y.abs().max().item())


# --------------------------------------------------------------------------
# Triton varlen kernels (interpreter): packed rows found from cu_q / cu_k
# --------------------------------------------------------------------------
def _varlen_oracle(q, k, v, cu_q, cu_k, max_q, max_k, *, gates=None, active=None, scale=None, keep=None, p=0.0):
    """Differentiable reference of attention_varlen in q's dtype: pad to [B, H, max, D], attention_reference
    with the key padding mask (and the kernels' dropout mask ``keep``), gather the valid query rows."""
    from kdfast.ops.attention import _varlen_index
    B = cu_q.numel() - 1
    bq, pq, _ = _varlen_index(cu_q.long(), max_q)
    bk, pk, kvalid = _varlen_index(cu_k.long(), max_k)

    def pad(x, b, pos, L):
        return x.new_zeros((B, L) + tuple(x.shape[1:])).index_put((b, pos), x).transpose(1, 2)

    out = attention_reference(pad(q, bq, pq, max_q), pad(k, bk, pk, max_k), pad(v, bk, pk, max_k), mask=kvalid,
                              head_gates=gates, active_heads=active, scale=scale, dropout_p=p, dropout_mask=keep)
    return out.transpose(1, 2)[bq, pq]


def _varlen_triton_case(lengths_q, lengths_k, H=3, D=16, seed=31):
    g = torch.Generator().manual_seed(seed)
    Tq, Tk = sum(lengths_q), sum(lengths_k)
    q = (torch.randn(Tq, H, D, generator=g) * 2).requires_grad_()
    k = (torch.randn(Tk, H, D, generator=g) * 2).requires_grad_()
    v = (torch.randn(Tk, H, D, generator=g) * 10).requires_grad_()

    def cu(lengths):
        return torch.tensor([0] + list(lengths)).cumsum(0).to(torch.int32)
    return q, k, v, cu(lengths_q), cu(lengths_k)


@pytest.mark.triton
@pytest.mark.parametrize("case", ["self_gates_bh", "self_gates_bh_dropout", "cross_gates_h_dropout"])
def test_triton_varlen_matches_oracle(case):
    # Odd lengths in one batch (1, 5, 17 tokens), max_seqlen above the longest sequence, an inactive
    # head, head gates (per sequence or per head); with dropout the reference gets the kernels' mask
    # (attention_dropout_mask with Lq/Lk = max_seqlen_q/k, sequence-local positions).
    from kdfast.ops.attention import attention_dropout_mask, attention_varlen, draw_dropout_rng
    lq = (1, 5, 17)
    lk = lq if case.startswith("self") else (3, 12, 6)
    max_q, max_k = 19, (19 if case.startswith("self") else 13)
    q, k, v, cu_q, cu_k = _varlen_triton_case(lq, lk)
    B, H = 3, q.shape[1]
    gates = (torch.rand(B, H) * 2 if "gates_bh" in case else torch.rand(H) + 0.5).requires_grad_()
    active = torch.tensor([True, False, True])
    p = 0.3 if "dropout" in case else 0.0
    torch.manual_seed(12)
    with kdfast.use_backend("triton"):
        out = attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, head_gates=gates, active_heads=active,
                               scale=0.3, dropout_p=p)
    keep = None
    if p > 0:
        torch.manual_seed(12)
        keep = attention_dropout_mask(draw_dropout_rng(), B, H, max_q, max_k, p)
    assert out.shape == q.shape and (out[:, 1] == 0).all()  # the inactive head outputs 0
    ins = (q, k, v, gates)
    go = torch.randn_like(out) * 3
    got = torch.autograd.grad(out, ins, go)
    ins64 = [x.detach().double().requires_grad_() for x in ins]
    ref64 = _varlen_oracle(*ins64[:3], cu_q, cu_k, max_q, max_k, gates=ins64[3], active=active, scale=0.3,
                           keep=keep, p=p)
    want = torch.autograd.grad(ref64, ins64, go.double())
    ins32 = [x.detach().requires_grad_() for x in ins]
    ref32 = _varlen_oracle(*ins32[:3], cu_q, cu_k, max_q, max_k, gates=ins32[3], active=active, scale=0.3,
                           keep=keep, p=p)
    tref = torch.autograd.grad(ref32, ins32, go)
    assert_close_to_oracle(out, ref64, ref32, torch.float32, what=f"{case} out")
    for name, a, b, c in zip("qkvg", got, want, tref):
        assert_close_to_oracle(a, b, c, torch.float32, what=f"{case} grad {name}")
    assert (got[0][:, 1] == 0).all() and (got[3][..., 1] == 0).all()


@pytest.mark.triton
def test_triton_varlen_matches_cpu_varlen_with_dropout():
    # One seed, one mask: the Triton and the CPU varlen kernels (and the reference) agree, trailing
    # tokens past cu_q[-1] included (0 in outputs and gradients), with an empty sequence in the batch.
    from kdfast.ops.attention import attention_varlen
    q, k, v, cu, _ = _varlen_triton_case((5, 0, 17), (5, 0, 17), H=2, D=8, seed=32)
    pad = lambda x: torch.cat([x.detach(), torch.randn(2, *x.shape[1:])]).requires_grad_()  # noqa: E731
    q, k, v = pad(q), pad(k), pad(v)
    backends_run = ["triton", "reference"] + (["cpu"] if kdfast._ext.extension() is not None else [])
    res = {}
    for be in backends_run:
        with kdfast.use_backend(be):
            torch.manual_seed(6)
            o = attention_varlen(q, k, v, cu, cu, 17, 17, head_gates=torch.tensor([0.5, 2.0]), dropout_p=0.2)
            res[be] = (o,) + torch.autograd.grad(o.square().sum(), (q, k, v))
    assert (res["triton"][0][22:] == 0).all() and all((g[22:] == 0).all() for g in res["triton"][1:])
    for be in backends_run[1:]:
        for a, b in zip(res["triton"], res[be]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())


@pytest.mark.triton
def test_triton_varlen_opcheck():
    from kdfast.ops.attention import _varlen_fwd
    q, k, v, cu, _ = _varlen_triton_case((3, 6), (3, 6), H=2, D=8, seed=33)
    gates = torch.rand(2, requires_grad=True)
    torch.library.opcheck(_varlen_fwd, (q.detach().requires_grad_(), k.detach(), v.detach(), cu.long(), cu.long(),
                                        6, 6, gates, None, 0.25, True, 0.0, None, "triton"))


def test_varlen_explain_prefers_triton_on_gpu():
    # What CUDA tensors would run (no GPU needed): the Triton varlen kernels, forward and backward.
    for op in ("attention_varlen", "attention_varlen_bwd"):
        ch = backends.plan(op, "cuda")
        assert ch.backend == ("triton" if backends.triton_available() is None else "reference"), ch
