"""ternary_linear: CPU kernels on every ISA path, dispatch, autograd, opcheck, compile, errors."""
import pytest
import torch
import torch.nn.functional as F

import kdfast
from kdfast import cpu_isa
from kdfast.ops import pack_ternary, quantize_activations, ternarize, ternary_linear
from kdfast.ops.ternary_linear import _ternary_linear, ternary_int_acc_reference, ternary_linear_reference
from tests.numerics import assert_close_to_oracle

SHAPES = [(1, 5, 7), (3, 9, 769), (4, 13, 130), (5, 4, 1), (7, 33, 64), (17, 6, 200), (100, 31, 3072)]


def _isas():
    try:
        return cpu_isa.available_isas()
    except RuntimeError:
        return ["scalar"]


def make(M, N, K, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) * 0.05
    codes, scale = ternarize(w)
    x = (torch.randn(M, K, generator=g) * 10).to(dtype)
    bias = torch.randn(N, generator=g)
    return x, pack_ternary(codes), scale, bias, codes


@pytest.mark.cpu
@pytest.mark.parametrize("isa", _isas())
@pytest.mark.parametrize("M,N,K", SHAPES)
def test_cpu_int8_exact(isa, M, N, K):
    x, p, scale, bias, codes = make(M, N, K, seed=M * 7 + K)
    q, sx = quantize_activations(x)
    with cpu_isa.use_cpu_isa(isa):
        acc = torch.ops.kdfast_C.ternary_matmul_i8_acc(q, p, K)
        q2, sx2 = torch.ops.kdfast_C.quantize_act_i8(x)
        y_fused = torch.ops.kdfast_C.ternary_linear_w2a8(x, p, scale, bias, K)
        y_i8 = torch.ops.kdfast_C.ternary_linear_i8(q, sx, p, scale, None, K)
    # integer sums are exact; int64 oracle
    assert torch.equal(acc.long(), q.long() @ codes.long().T)
    assert torch.equal(q2, q) and torch.equal(sx2, sx)
    # the float epilogue ((acc * sx) * scale) + bias is bitwise the reference's
    assert torch.equal(y_fused, ternary_linear_reference(x, p, scale, bias, act_bits=8))
    assert torch.equal(y_i8, (acc.float() * sx[:, None]) * scale[None, :])


@pytest.mark.cpu
@pytest.mark.parametrize("amx", ["1", "0"])
# (400, 1376, 70) and (390, 1370, 65): float output > 2 MiB, written with streaming stores where rows are aligned
@pytest.mark.parametrize("M,N,K", [(64, 33, 769), (100, 70, 3072), (130, 1, 1), (65, 40, 64), (400, 1376, 70),
                                   (390, 1370, 65)])
def test_cpu_int8_amx_and_vnni_gemm(monkeypatch, amx, M, N, K):
    """M >= 64 takes the AMX tile path where the CPU has AMX (KDFAST_TERNARY_AMX=0 forces VNNI)."""
    if amx == "1" and not torch.ops.kdfast_C.ternary_amx_available():
        pytest.skip("this CPU has no AMX-INT8 (the VNNI case still runs)")
    monkeypatch.setenv("KDFAST_TERNARY_AMX", amx)
    x, p, scale, bias, codes = make(M, N, K, seed=M + N)
    q, sx = quantize_activations(x)
    acc = torch.ops.kdfast_C.ternary_matmul_i8_acc(q, p, K)
    assert torch.equal(acc.long(), q.long() @ codes.long().T)
    y = torch.ops.kdfast_C.ternary_linear_w2a8(x, p, scale, bias, K)
    assert torch.equal(y, ternary_linear_reference(x, p, scale, bias, act_bits=8))


@pytest.mark.cpu
@pytest.mark.parametrize("isa", _isas())
@pytest.mark.parametrize("M,N,K", SHAPES)
def test_cpu_float_vs_oracle(isa, M, N, K):
    x, p, scale, bias, _ = make(M, N, K, seed=M + K)
    with cpu_isa.use_cpu_isa(isa):
        y = torch.ops.kdfast_C.ternary_linear_f32(x, p, scale, bias, K)
    oracle = ternary_linear_reference(x.double(), p, scale, bias)
    torch_ref = ternary_linear_reference(x, p, scale, bias)
    assert_close_to_oracle(y, oracle, torch_ref, torch.float32)


@pytest.mark.cpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("act_bits", [None, 8])
def test_public_op_cpu(dtype, act_bits):
    x, p, scale, bias, _ = make(6, 11, 97, dtype=dtype)
    x3 = x.reshape(2, 3, 97)
    assert kdfast.explain("ternary_linear", x, p, scale, bias, act_bits or 0).backend == "cpu"
    y = ternary_linear(x3, p, scale, bias, act_bits=act_bits)
    assert y.shape == (2, 3, 11) and y.dtype == dtype
    if act_bits == 8:
        ref = ternary_linear_reference(x.float(), p, scale, bias, act_bits=8).to(dtype)
        assert torch.equal(y.reshape(6, 11), ref)
    else:
        oracle = ternary_linear_reference(x.double(), p, scale, bias)
        assert_close_to_oracle(y.reshape(6, 11), oracle, ternary_linear_reference(x, p, scale, bias), dtype)


def test_reference_backend_and_noncontiguous():
    x, p, scale, bias, _ = make(8, 10, 150)
    xt = torch.randn(150, 8).T * 10  # non-contiguous
    with kdfast.use_backend("reference"):
        y = ternary_linear(xt, p, scale, bias)
    torch.testing.assert_close(y, ternary_linear(xt.contiguous(), p, scale, bias), rtol=1e-5, atol=1e-4)
    # tensor-granularity scale [1]
    y1 = ternary_linear(x, p, scale[:1], None)
    torch.testing.assert_close(y1, ternary_linear(x, p, scale[:1].expand(10).contiguous(), None))


@pytest.mark.parametrize("act_bits", [None, 8])
def test_autograd(act_bits):
    x, p, scale, bias, codes = make(5, 7, 70)
    x = x.requires_grad_()
    b = bias.clone().requires_grad_()
    g = torch.randn(5, 7)
    (ternary_linear(x, p, scale, b, act_bits=act_bits) * g).sum().backward()
    w = codes.float() * scale[:, None]
    # straight-through: the gradient of x @ W^T + b, also for act_bits=8
    torch.testing.assert_close(x.grad, g @ w)
    torch.testing.assert_close(b.grad, g.sum(0))


def test_opcheck():
    x, p, scale, bias, _ = make(3, 5, 70)
    for ab in (0, 8):
        backend = kdfast.explain("ternary_linear", x, p, scale, bias, ab).backend
        torch.library.opcheck(_ternary_linear, (x.requires_grad_(), p, scale, bias, ab, backend))
        torch.library.opcheck(_ternary_linear, (x.detach(), p, scale, None, ab, "reference"))


def test_torch_compile_fullgraph():
    x, p, scale, bias, _ = make(4, 9, 100)
    f = torch.compile(lambda x: ternary_linear(x, p, scale, bias, act_bits=8), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(f(x), ternary_linear(x, p, scale, bias, act_bits=8))


def test_errors():
    x, p, scale, bias, _ = make(2, 4, 70)
    with pytest.raises(TypeError, match="packed_weight must have dtype"):
        ternary_linear(x, p.to(torch.int8), scale)
    with pytest.raises(ValueError, match=r"16 \* ceil\(K / 64\)"):
        ternary_linear(x[:, :60], p, scale)
    with pytest.raises(TypeError, match="x must have dtype"):
        ternary_linear(x.long(), p, scale)
    with pytest.raises(ValueError, match="scale must have shape"):
        ternary_linear(x, p, scale[:3])
    with pytest.raises(ValueError, match="bias must have shape"):
        ternary_linear(x, p, scale, bias[:2])
    with pytest.raises(ValueError, match="act_bits"):
        ternary_linear(x, p, scale, act_bits=4)
    with pytest.raises(ValueError, match="one device"):
        ternary_linear(x, p.to("meta"), scale)
    with pytest.raises(kdfast.BackendUnavailable, match="cuda"):
        with kdfast.use_backend("cuda"):
            ternary_linear(x, p, scale)


@pytest.mark.cpu
def test_cpu_kernel_guards():
    x, p, scale, bias, _ = make(2, 4, 70)
    with pytest.raises(RuntimeError, match="columns"):
        torch.ops.kdfast_C.ternary_linear_f32(torch.randn(2, 200), p, scale, None, 200)
    with pytest.raises(RuntimeError, match="uint8"):
        torch.ops.kdfast_C.ternary_linear_f32(x, p.float(), scale, None, 70)
    with pytest.raises(RuntimeError, match="scale"):
        torch.ops.kdfast_C.ternary_linear_w2a8(x, p, scale[:2], None, 70)


def test_int_acc_reference_large_k_is_exact():
    g = torch.Generator().manual_seed(1)
    K = 140000  # 127 * K > 2^24: the reference switches to float64
    q = torch.randint(-127, 128, (2, K), generator=g, dtype=torch.int8)
    codes = torch.randint(-1, 2, (3, K), generator=g, dtype=torch.int8)
    acc = ternary_int_acc_reference(q, pack_ternary(codes), K)
    assert torch.equal(acc.long(), q.long() @ codes.long().T)


def test_matches_f_linear():
    x, p, scale, bias, codes = make(9, 12, 300)
    w = codes.float() * scale[:, None]
    torch.testing.assert_close(ternary_linear(x, p, scale, bias), F.linear(x, w, bias), rtol=1e-5, atol=1e-4)


# ---- float activations at large M: decode once + torch GEMM ---------------------------------------------
@pytest.mark.cpu
@pytest.mark.parametrize("isa", _isas())
@pytest.mark.parametrize("K", [1, 7, 63, 64, 65, 769, 3072])
def test_cpu_decode_matches_unpack(isa, K):
    from kdfast.ops.ternary_quant import unpack_ternary
    g = torch.Generator().manual_seed(K)
    N = 11
    # every byte value, including the unused field 3 (decodes to 2 like unpack_ternary)
    p = torch.randint(0, 256, (N, 16 * ((K + 63) // 64)), generator=g, dtype=torch.uint8)
    scale = torch.randn(N, generator=g) * 3
    codes = unpack_ternary(p, K)
    with cpu_isa.use_cpu_isa(isa):
        for dt in (torch.float32, torch.bfloat16, torch.float16):
            d = torch.ops.kdfast_C.ternary_decode(p, None, K, dt)
            assert d.dtype == dt and d.shape == (N, K)
            assert torch.equal(d, codes.to(dt))
            ds = torch.ops.kdfast_C.ternary_decode(p, scale, K, dt)
            assert torch.equal(ds, codes.to(dt) * scale.to(dt)[:, None])
            # a row slice of the packed weight (what the chunked path passes)
            assert torch.equal(torch.ops.kdfast_C.ternary_decode(p[3:7], scale[3:7], K, dt), ds[3:7])


@pytest.mark.cpu
def test_cpu_decode_errors():
    p = torch.zeros(4, 32, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="columns"):
        torch.ops.kdfast_C.ternary_decode(p, None, 200, torch.float32)
    with pytest.raises(RuntimeError, match="uint8"):
        torch.ops.kdfast_C.ternary_decode(p.float(), None, 100, torch.float32)
    with pytest.raises(RuntimeError, match="scale"):
        torch.ops.kdfast_C.ternary_decode(p, torch.ones(3), 100, torch.float32)
    with pytest.raises(RuntimeError, match="dtype"):
        torch.ops.kdfast_C.ternary_decode(p, None, 100, torch.float64)
    assert torch.ops.kdfast_C.ternary_decode(p[:0], None, 100, torch.float32).shape == (0, 100)


@pytest.mark.cpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("chunk", [None, 16000])
def test_cpu_dense_path_around_threshold(monkeypatch, dtype, chunk):
    """M below the threshold runs the register-unpack kernel, M at or above it the decode + GEMM path
    (with chunk: the weight decoded in slices of rows); both within the numerics rule, with and without
    bias, for non-contiguous x."""
    import importlib
    tl = importlib.import_module("kdfast.ops.ternary_linear")
    if chunk:
        monkeypatch.setattr(tl, "DENSE_SLICE_ABOVE", chunk)
        monkeypatch.setattr(tl, "DENSE_SLICE", chunk)
    calls = []
    dense = tl._cpu_dense
    monkeypatch.setattr(tl, "_cpu_dense", lambda *a: calls.append(1) or dense(*a))
    thr = tl._dense_min_rows(dtype)
    for M, N, K in [(thr - 1, 37, 769), (thr, 40, 130), (thr + 1, 33, 3072), (2 * thr + 3, 70, 65)]:
        x, p, scale, bias, _ = make(M, N, K, seed=M + K, dtype=dtype)
        xt = (torch.randn(K, M, generator=torch.Generator().manual_seed(M)) * 10).to(dtype).T
        for xin, b in ((x, bias), (xt, None), (xt, bias)):
            calls.clear()
            y = ternary_linear(xin, p, scale, b)
            assert len(calls) == (M >= thr)
            assert y.dtype == dtype and y.shape == (M, N)
            oracle = ternary_linear_reference(xin.double(), p, scale, b)
            assert_close_to_oracle(y, oracle, ternary_linear_reference(xin, p, scale, b), dtype)


@pytest.mark.cpu
@pytest.mark.parametrize("isa", _isas())
def test_cpu_dense_path_every_isa(isa):
    from kdfast.ops.ternary_linear import _dense_min_rows
    for dtype in (torch.float32, torch.bfloat16):
        M = _dense_min_rows(dtype)
        x, p, scale, bias, _ = make(M, 21, 200, seed=3, dtype=dtype)
        with cpu_isa.use_cpu_isa(isa):
            y = ternary_linear(x, p, scale, bias)
        oracle = ternary_linear_reference(x.double(), p, scale, bias)
        assert_close_to_oracle(y, oracle, ternary_linear_reference(x, p, scale, bias), dtype)


@pytest.mark.cpu
@pytest.mark.parametrize("isa", _isas())
def test_cpu_quantize_ties_match_reference(isa):
    """x / s at (and one ulp around) half-integers: round(x * (1 / s)) differs from round(x / s) for
    dozens of these values (checked below), so a kernel that quantizes with a reciprocal instead of the
    division fails here; q must stay bitwise the reference's (round half to even)."""
    K = 254
    rows = []
    for sc in (0.3, 0.7, 1.3, 0.0123, 7.77):
        base = ((torch.arange(K, dtype=torch.float64) - 127 + 0.5).clamp(-126.5, 126.5) * sc).float()
        for r in (base, base.nextafter(torch.full_like(base, 1e9)), base.nextafter(torch.full_like(base, -1e9))):
            r = r.clone()
            r[0] = sc * 127
            rows.append(r)
    x = torch.stack(rows + [torch.randn(K) * 10 for _ in range(3)])
    q_ref, s_ref = quantize_activations(x)
    naive = torch.round(x * (1 / s_ref[:, None])).clamp(-127, 127).to(torch.int8)
    assert (naive != q_ref).sum() > 50  # the data does exercise the fallback
    with cpu_isa.use_cpu_isa(isa):
        q, s = torch.ops.kdfast_C.quantize_act_i8(x)
        y = torch.ops.kdfast_C.ternary_linear_w2a8(x, *make(1, 5, K)[1:3], None, K)
    assert torch.equal(s, s_ref) and torch.equal(q, q_ref)
    _, p, scale, _, _ = make(1, 5, K)
    assert torch.equal(y, ternary_linear_reference(x, p, scale, None, act_bits=8))


@pytest.mark.cpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_dense_path_without_low_precision_gemm(monkeypatch, dtype):
    """A CPU without native bf16 / fp16 GEMM: the fp32 threshold, and the GEMM in fp32."""
    import importlib
    tl = importlib.import_module("kdfast.ops.ternary_linear")
    monkeypatch.setattr(tl, "_fast_low_precision_gemm", lambda dt: False)
    assert tl._dense_min_rows(dtype) == tl.DENSE_MIN_ROWS[torch.float32]
    M = tl.DENSE_MIN_ROWS[torch.float32]
    x, p, scale, bias, _ = make(M, 19, 300, seed=5, dtype=dtype)
    y = ternary_linear(x, p, scale, bias)
    assert y.dtype == dtype
    oracle = ternary_linear_reference(x.double(), p, scale, bias)
    assert_close_to_oracle(y, oracle, ternary_linear_reference(x, p, scale, bias), dtype)


@pytest.mark.cpu
def test_torch_compile_fullgraph_dense_path():
    from kdfast.ops.ternary_linear import DENSE_MIN_ROWS
    x, p, scale, bias, _ = make(DENSE_MIN_ROWS[torch.float32], 9, 100)
    f = torch.compile(lambda x: ternary_linear(x, p, scale, bias), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(f(x), ternary_linear(x, p, scale, bias))
