"""kd_loss on the reference and CPU backends against the float64 oracle.

Triton and CUDA kernels have their own files in tests/kernels (same checks).
"""
import pytest
import torch
import torch.nn.functional as F

import kdfast
from kdfast.ops.kd_loss import kd_loss, kd_loss_reference_in
from tests.numerics import assert_close_to_oracle

NEG_INF = float("-inf")
BACKENDS = [pytest.param("reference"), pytest.param("cpu", marks=pytest.mark.cpu)]


def make_inputs(n=37, v=1271, scale=10.0, dtype=torch.float32, masked=True, labels=True, seed=0):
    """Realistic logits: scale ~10, some padded (-inf in both) positions, one fully masked row,
    labels with ignored rows (never pointing at a masked position)."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, v, generator=g, dtype=torch.float64) * scale
    t = torch.randn(n, v, generator=g, dtype=torch.float64) * scale + 0.5 * s
    if masked and n > 2:
        s[1, v // 2:] = NEG_INF
        t[1, v // 2:] = NEG_INF
        s[2] = NEG_INF
        t[2] = NEG_INF
    lab = None
    if labels:
        lab = torch.randint(0, max(1, v // 2), (n,), generator=g)
        lab[::4] = -100
        if masked and n > 2:
            lab[2] = -100
    return s.to(dtype), t.to(dtype), lab


def loss_and_grad(backend, s, t, lab, gout=1.7, **opts):
    s = s.detach().clone().requires_grad_(True)
    with kdfast.use_backend(backend):
        loss = kd_loss(s, t, lab, **opts)
    (loss * gout).sum().backward()
    return loss.detach(), s.grad


def oracle(s, t, lab, gout=1.7, compute_dtype=None, **opts):
    """float64 oracle (or same-dtype torch reference with compute_dtype)."""
    x = s.detach().to(compute_dtype or torch.float64).requires_grad_(True)
    loss = kd_loss_reference_in(compute_dtype, x, t.to(x.dtype), lab, **opts)
    (loss * gout).sum().backward()
    return loss.detach(), x.grad


def check(backend, s, t, lab, dtype=torch.float32, gout=1.7, **opts):
    out, g = loss_and_grad(backend, s, t, lab, gout, **opts)
    ref64, g64 = oracle(s, t, lab, gout, **opts)
    ref, gref = oracle(s, t, lab, gout, compute_dtype=dtype if dtype != torch.float64 else None, **opts)
    assert out.dtype == torch.float32 or dtype == torch.float64
    assert g.dtype == s.dtype and g.shape == s.shape
    assert_close_to_oracle(out.reshape(-1), ref64.reshape(-1), ref.reshape(-1), dtype, what="loss")
    assert_close_to_oracle(g, g64, gref, dtype, what="grad")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence,beta", [("kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.0),
                                             ("jsd", 1.0), ("jsd", 0.2)])
@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_divergences_match_oracle(backend, divergence, beta, temperature):
    s, t, lab = make_inputs(seed=int(temperature * 10))
    check(backend, s, t, lab, temperature=temperature, divergence=divergence, beta=beta, soft_weight=0.7,
          hard_weight=0.3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
@pytest.mark.parametrize("with_labels", [True, False])
def test_reductions(backend, reduction, with_labels):
    s, t, lab = make_inputs(n=19, v=97, labels=with_labels, seed=3)
    check(backend, s, t, lab, temperature=2.0, reduction=reduction, hard_weight=0.5 if with_labels else 0.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", ["kl", "reverse_kl", "jsd"])
def test_logits_of_scale_100(backend, divergence):
    s, t, lab = make_inputs(n=16, v=1271, scale=100.0, seed=5)
    check(backend, s, t, lab, temperature=2.0, divergence=divergence, hard_weight=0.5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("divergence", ["kl", "jsd"])
def test_half_precision(backend, dtype, divergence):
    s, t, lab = make_inputs(n=24, v=1271, dtype=dtype, seed=7)
    check(backend, s, t, lab, dtype=dtype, temperature=2.0, divergence=divergence, hard_weight=0.5)


@pytest.mark.cpu
@pytest.mark.parametrize("divergence", ["kl", "reverse_kl", "jsd"])
def test_every_cpu_isa_path(divergence):
    from kdfast import cpu_isa
    s, t, lab = make_inputs(n=9, v=3001, seed=11)  # V not a multiple of any vector width or block
    for isa in cpu_isa.available_isas():
        with cpu_isa.use_cpu_isa(isa):
            check("cpu", s, t, lab, temperature=2.0, divergence=divergence, hard_weight=0.4)


@pytest.mark.cpu
def test_large_vocabulary_row_block_boundaries():
    # V = 128256 crosses many 2048-element accumulation blocks.
    s, t, lab = make_inputs(n=3, v=128256, masked=False, seed=13)
    check("cpu", s, t, lab, temperature=2.0, hard_weight=0.5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_dtypes_teacher_fp32_student_bf16(backend):
    s, t, lab = make_inputs(n=8, v=513, seed=17)
    out, g = loss_and_grad(backend, s.bfloat16(), t, lab, temperature=2.0)
    ref, g64 = oracle(s.bfloat16(), t, lab, temperature=2.0)
    assert g.dtype == torch.bfloat16
    assert torch.allclose(out.double(), ref, rtol=1e-4)
    assert torch.allclose(g.double(), g64, rtol=2e-2, atol=2e-3 * g64.abs().max().item())


@pytest.mark.parametrize("backend", BACKENDS)
def test_masks_give_no_nan_and_zero_for_dead_rows(backend):
    s, t, lab = make_inputs(n=6, v=50, seed=19)
    out, g = loss_and_grad(backend, s, t, None, temperature=2.0, reduction="none")
    assert torch.isfinite(out).all() and torch.isfinite(g).all()
    assert out[2] == 0 and (g[2] == 0).all()            # fully masked row
    assert (g[1, 25:] == 0).all()                        # masked positions get no gradient


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignored_rows_contribute_nothing(backend):
    s, t, lab = make_inputs(n=8, v=64, masked=False, seed=23)
    lab[:] = -100
    lab[3] = 5
    out, g = loss_and_grad(backend, s, t, lab, temperature=2.0, hard_weight=1.0)
    one, g1 = loss_and_grad(backend, s[3:4], t[3:4], lab[3:4], temperature=2.0, hard_weight=1.0)
    assert torch.allclose(out, one, rtol=1e-5)
    assert (g[torch.arange(8) != 3] == 0).all()
    lab[3] = -100
    out, g = loss_and_grad(backend, s, t, lab, temperature=2.0, hard_weight=1.0)
    assert out == 0 and (g == 0).all()  # no counted row: 0, not NaN


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_and_single_row(backend):
    s, t, _ = make_inputs(n=1, v=31, masked=False, labels=False)
    check(backend, s, t, None, temperature=2.0)
    e = torch.empty(0, 31)
    out, g = loss_and_grad(backend, e, e, None)
    assert out == 0 and g.shape == (0, 31)
    one = torch.randn(5, 1) * 10  # V = 1: every distribution is a point mass
    out, g = loss_and_grad(backend, one, one * 2, None)
    assert out == 0 and (g == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_and_leading_dims(backend):
    g = torch.Generator().manual_seed(29)
    big_s = torch.randn(4, 9, 2 * 211, generator=g) * 10
    big_t = torch.randn(4, 9, 2 * 211, generator=g) * 10
    s, t = big_s[..., ::2], big_t[:, :, 1::2]           # stride 2 along V
    lab = torch.randint(0, 211, (4, 9), generator=g)
    check(backend, s, t, lab, temperature=2.0, hard_weight=0.5)
    rows_s = torch.randn(40, 300, generator=g)[:, :211] * 10  # row stride 300, unit stride on V
    rows_t = torch.randn(40, 300, generator=g)[:, :211] * 10
    check(backend, rows_s, rows_t, None, temperature=3.0, reduction="none")


@pytest.mark.parametrize("backend", BACKENDS)
def test_teacher_log_probs_equal_logits(backend):
    s, t, lab = make_inputs(n=10, v=200, masked=False, seed=31)
    a, ga = loss_and_grad(backend, s, t, lab, temperature=2.0)
    b, gb = loss_and_grad(backend, s, F.log_softmax(t, -1), lab, temperature=2.0)
    assert torch.allclose(a, b, rtol=1e-5) and torch.allclose(ga, gb, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_torch_kl_div_and_cross_entropy(backend):
    """The documented PyTorch equivalent."""
    s, t, lab = make_inputs(n=12, v=300, masked=False, seed=37)
    T = 2.0
    out, _ = loss_and_grad(backend, s, t, lab, temperature=T, soft_weight=0.5, hard_weight=0.5,
                           reduction="sum")
    keep = lab != -100
    kl = F.kl_div(F.log_softmax(s[keep] / T, -1), F.log_softmax(t[keep] / T, -1), log_target=True,
                  reduction="sum")
    ce = F.cross_entropy(s, lab, reduction="sum", ignore_index=-100)
    assert torch.allclose(out, 0.5 * T * T * kl + 0.5 * ce, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_in_nan_out(backend):
    s, t, _ = make_inputs(n=4, v=40, masked=False, labels=False)
    s[1, 3] = float("nan")
    with kdfast.use_backend(backend):
        out = kd_loss(s, t, reduction="none")
    assert torch.isnan(out[1]) and torch.isfinite(out[[0, 2, 3]]).all()


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(41)
    s = (torch.randn(5, 7, generator=g, dtype=torch.float64) * 3).requires_grad_(True)
    t = torch.randn(5, 7, generator=g, dtype=torch.float64) * 3
    lab = torch.tensor([1, -100, 6, 0, 3])
    for div in ("kl", "reverse_kl", "jsd"):
        fn = lambda x: kd_loss(x, t, lab, temperature=2.0, divergence=div, hard_weight=0.3, reduction="none")  # noqa: E731
        assert torch.autograd.gradcheck(fn, (s,), eps=1e-6, atol=1e-5)


@pytest.mark.cpu
@pytest.mark.parametrize("with_labels", [True, False])
def test_opcheck(with_labels):
    s, t, lab = make_inputs(n=6, v=37, masked=False, labels=with_labels)
    s.requires_grad_(True)
    args = (s, t, lab, 2.0, 2, 0.5, -100, with_labels, "cpu")
    torch.library.opcheck(torch.ops.kdfast.kd_loss_fwd.default, args)
    rows, stats = torch.ops.kdfast.kd_loss_fwd(*args)
    bargs = (s.detach(), t, lab, stats.detach(), torch.randn(6, 2), 2.0, 2, 0.5, -100, with_labels, "cpu")
    torch.library.opcheck(torch.ops.kdfast.kd_loss_bwd.default, bargs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    s, t, lab = make_inputs(n=8, v=129, masked=True, seed=43)

    def step(x, y, z):
        return kd_loss(x, y, z, temperature=2.0, divergence="jsd", hard_weight=0.5) * 3.0

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    x = s.clone().requires_grad_(True)
    with kdfast.use_backend(backend):
        out = compiled(x, t, lab)
        out.backward()
    ref, gref = loss_and_grad(backend, s, t, lab, gout=3.0, temperature=2.0, divergence="jsd", hard_weight=0.5)
    assert torch.allclose(out, ref * 3.0, rtol=1e-5)
    assert torch.allclose(x.grad, gref, rtol=1e-5, atol=1e-8)


@pytest.mark.slow
def test_torch_compile_inductor():
    s, t, lab = make_inputs(n=8, v=129, masked=False, seed=47)
    compiled = torch.compile(lambda x, y, z: kd_loss(x, y, z, temperature=2.0, hard_weight=0.5), fullgraph=True)
    x = s.clone().requires_grad_(True)
    out = compiled(x, t, lab)
    out.backward()
    ref, gref = loss_and_grad("reference", s, t, lab, gout=1.0, temperature=2.0, hard_weight=0.5)
    assert torch.allclose(out, ref, rtol=1e-5) and torch.allclose(x.grad, gref, rtol=1e-4, atol=1e-8)


def test_module_matches_function():
    s, t, lab = make_inputs(n=10, v=77, seed=53)
    m = kdfast.nn.KDLoss(temperature=3.0, divergence="reverse_kl", hard_weight=0.25, reduction="sum")
    assert torch.equal(m(s, t, lab), kd_loss(s, t, lab, temperature=3.0, divergence="reverse_kl",
                                             hard_weight=0.25, reduction="sum"))
    assert "temperature=3.0" in repr(m)
    with pytest.raises(ValueError, match="temperature must be a positive number"):
        kdfast.nn.KDLoss(temperature=0)


def test_teacher_gets_no_gradient():
    s, t, _ = make_inputs(n=4, v=20, masked=False, labels=False)
    s.requires_grad_(True)
    t.requires_grad_(True)
    kd_loss(s, t).backward()
    assert s.grad is not None and t.grad is None


@pytest.mark.parametrize("call,match", [
    (lambda s, t: kd_loss(s, t[:, :-1]), "same shape"),
    (lambda s, t: kd_loss(s.long(), t), "student_logits must have dtype"),
    (lambda s, t: kd_loss(s, t.to("meta")), "one device"),
    (lambda s, t: kd_loss(s, t, temperature=0.0), "temperature must be a positive number"),
    (lambda s, t: kd_loss(s, t, divergence="kld"), "divergence must be one of"),
    (lambda s, t: kd_loss(s, t, reduction="avg"), "reduction must be one of"),
    (lambda s, t: kd_loss(s, t, divergence="jsd", beta=1.5), r"beta must be a number in \[0, 1\]"),
    (lambda s, t: kd_loss(s, t, torch.zeros(3, dtype=torch.long)), "labels must have one entry per row"),
    (lambda s, t: kd_loss(s, t, torch.full((4,), 20)), r"labels must be in \[0, 20\)"),
    (lambda s, t: kd_loss(s, t, torch.zeros(4)), "labels must have dtype"),
    (lambda s, t: kd_loss(s[:, :0], t[:, :0]), "non-empty last dimension"),
    (lambda s, t: kd_loss([1.0], t), "student_logits must be a torch.Tensor"),
])
def test_bad_input_errors(call, match):
    s, t, _ = make_inputs(n=4, v=20, masked=False, labels=False)
    with pytest.raises((ValueError, TypeError), match=match):
        call(s, t)


# --------------------------------------------------------------------------
# The fused CPU path: forward computes the gradient, backward scales it.
# --------------------------------------------------------------------------
def _grads_both_paths(monkeypatch, s, t, lab, gout, retain=False, **opts):
    import importlib
    mod = importlib.import_module("kdfast.ops.kd_loss")
    out = []
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(mod, "_fused_cpu_ok", lambda *a: False)
        x = s.detach().clone().requires_grad_(True)
        with kdfast.use_backend("cpu"):
            loss = kd_loss(x, t, lab, **opts)
        name = type(loss.grad_fn).__name__
        assert ("_KDLossFusedCPU" in name) == fused, name
        g = gout.reshape(loss.shape) if torch.is_tensor(gout) else torch.full(loss.shape, float(gout))
        loss.backward(g, retain_graph=retain)
        first = x.grad.clone()
        if retain:  # a second backward through the same graph recomputes the same gradient
            x.grad = None
            loss.backward(g)
            tol = 1e-6 * first.nan_to_num().abs().max()
            assert torch.allclose(x.grad, first, rtol=1e-5, atol=tol, equal_nan=True)
        out.append((loss.detach(), first))
    return out


@pytest.mark.cpu
@pytest.mark.parametrize("divergence", ["kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
@pytest.mark.parametrize("gout", [1.0, -0.3])
def test_fused_cpu_path_equals_two_kernel_path(monkeypatch, divergence, reduction, gout):
    s, t, lab = make_inputs(n=21, v=777, seed=29)
    s[5, 3] = float("nan")  # NaN row: NaN loss and gradient on both paths
    opts = dict(temperature=2.0, divergence=divergence, reduction=reduction, hard_weight=0.3, soft_weight=0.8)
    (l1, g1), (l2, g2) = _grads_both_paths(monkeypatch, s.float(), t.float(), lab, gout, retain=True, **opts)
    assert torch.equal(l1.isnan(), l2.isnan()) and torch.equal(g1.isnan(), g2.isnan())
    assert torch.allclose(l1.nan_to_num(), l2.nan_to_num(), rtol=1e-5, atol=1e-6)
    assert torch.allclose(g1.nan_to_num(), g2.nan_to_num(), rtol=1e-4, atol=1e-7 * g2.nan_to_num().abs().max())


@pytest.mark.cpu
@pytest.mark.parametrize("temperature", [1.0, 3.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_cpu_path_against_oracle_unit_grad_output(temperature, dtype):
    # grad_output = 1 returns the forward's gradient as is: check it against float64.
    s, t, lab = make_inputs(n=19, v=1031, dtype=dtype, seed=31)
    check("cpu", s, t, lab, dtype=dtype, gout=1.0, temperature=temperature, hard_weight=0.5)


@pytest.mark.cpu
def test_fused_cpu_path_per_row_grad_output_and_no_grad_forward(monkeypatch):
    s, t, lab = make_inputs(n=12, v=300, seed=37)
    gout = torch.linspace(-2, 2, 12)
    (l1, g1), (l2, g2) = _grads_both_paths(monkeypatch, s.float(), t.float(), lab, gout, reduction="none",
                                           temperature=2.0)
    assert torch.allclose(g1, g2, rtol=1e-4, atol=1e-8)
    with torch.no_grad():  # no gradient wanted: the plain forward, no gradient buffer
        out = kd_loss(s.float().requires_grad_(), t.float(), lab, temperature=2.0)
    assert out.grad_fn is None
    assert torch.allclose(out, l2.sum() / (lab != -100).sum(), rtol=1e-5)


@pytest.mark.cpu
@pytest.mark.parametrize("row_weights", [False, True])
def test_fwd_grad_op_cpu_equals_reference_and_explain_names_it(row_weights):
    from kdfast import backends
    s, t, lab = make_inputs(n=9, v=257, seed=41)
    s, t = s.float(), t.float()
    w = torch.rand(9, 2) if row_weights else None
    args = (s, t, lab, 2.0, 0, 0.5, -100, True, 0.7, 0.3, w)
    assert backends.explain("kd_loss_fwd_grad", s, t).backend == "cpu"
    rows_c, stats_c, grad_c = backends.run("kd_loss_fwd_grad", *args, backend="cpu")
    rows_r, _, grad_r = backends.run("kd_loss_fwd_grad", *args, backend="reference")
    assert torch.allclose(rows_c, rows_r, rtol=1e-5, atol=1e-6)
    assert torch.allclose(grad_c, grad_r.to(grad_c.dtype), rtol=1e-4, atol=1e-6)
    with kdfast.use_backend("reference"):  # a forced backend turns the fused CPU path off
        x = s.clone().requires_grad_(True)
        assert "_KDLossFusedCPU" not in type(kd_loss(x, t, lab, hard_weight=0.3).grad_fn).__name__
