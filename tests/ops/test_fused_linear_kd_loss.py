"""fused_linear_kd_loss against the float64 oracle (materialised logits + kd_loss_reference)."""
import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import kdfast
from kdfast.nn import FusedLinearKDLoss
from kdfast.ops import fused_linear_kd_loss, fused_linear_kd_loss_reference
from kdfast.ops.fused_linear_kd_loss import default_chunk_size
from tests.numerics import assert_close_to_oracle

pytestmark = pytest.mark.cpu  # default backend here is the compiled CPU kd kernels


def make(N, V, Hs, Ht, dtype=torch.float32, bias=True, teacher_bias=True, seed=0, ignored=True):
    g = torch.Generator().manual_seed(seed)
    # Weights scaled so logits have a spread of ~10 (realistic LM-head logits).
    sh = torch.randn(N, Hs, generator=g)
    sw = torch.randn(V, Hs, generator=g) * (10 / Hs ** 0.5)
    sb = torch.randn(V, generator=g) if bias else None
    th = torch.randn(N, Ht, generator=g)
    tw = torch.randn(V, Ht, generator=g) * (10 / Ht ** 0.5)
    tb = torch.randn(V, generator=g) if teacher_bias else None
    lab = torch.randint(0, V, (N,), generator=g)
    if ignored and N > 2:
        lab[1::3] = -100
    cast = lambda x: None if x is None else x.to(dtype)  # noqa: E731
    return dict(sh=cast(sh), sw=cast(sw), sb=cast(sb), th=cast(th), tw=cast(tw), tb=cast(tb), labels=lab)


def run(fn, d, dtype, opts, grad_out_seed=1, chunk_size=None):
    """Loss and gradients (student hidden, weight, bias) of fn at dtype, grad_output random."""
    leaves = [None if d[k] is None else d[k].detach().to(dtype).requires_grad_() for k in ("sh", "sw", "sb")]
    kw = dict(student_bias=leaves[2], teacher_bias=None if d["tb"] is None else d["tb"].to(dtype), **opts)
    if chunk_size is not None:
        kw["chunk_size"] = chunk_size
    out = fn(leaves[0], leaves[1], d["th"].to(dtype), d["tw"].to(dtype), d["labels"], **kw)
    go = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_out_seed), dtype=torch.float64) * 1.5
    wrt = [x for x in leaves if x is not None]
    grads = torch.autograd.grad(out, wrt, go.to(out.dtype))
    return out, list(grads)


def check(d, opts, dtype=torch.float32, chunk_size=None):
    out, grads = run(fused_linear_kd_loss, d, dtype, opts, chunk_size=chunk_size)
    oracle, ograds = run(fused_linear_kd_loss_reference, d, torch.float64, opts)
    tref, tgrads = run(fused_linear_kd_loss_reference, d, dtype, opts)
    assert out.dtype == torch.float32
    assert_close_to_oracle(out, oracle, tref, dtype, what="loss")
    for name, g, og, tg in zip(("grad hidden", "grad weight", "grad bias"), grads, ograds, tgrads):
        assert g.dtype == dtype, name
        assert_close_to_oracle(g, og, tg, dtype, what=name)


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
@pytest.mark.parametrize("divergence", ["kl", "reverse_kl", "jsd"])
def test_matches_oracle(divergence, reduction):
    d = make(37, 101, 16, 24, seed=hash((divergence, reduction)) % 1000)
    opts = dict(temperature=2.0, divergence=divergence, beta=0.3, soft_weight=0.7, hard_weight=0.4,
                reduction=reduction)
    check(d, opts, chunk_size=10)  # 10 does not divide 37


@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_jsd_beta_limits(beta):
    check(make(20, 61, 8, 8), dict(divergence="jsd", beta=beta, temperature=4.0), chunk_size=7)


@pytest.mark.parametrize("reduction", ["batchmean", "none"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(dtype, reduction):
    d = make(29, 257, 32, 48)
    check(d, dict(temperature=2.0, divergence="kl", hard_weight=0.5, reduction=reduction), dtype, chunk_size=8)


@pytest.mark.parametrize("bias,teacher_bias", [(False, False), (True, False), (False, True)])
def test_bias_combinations_and_no_labels(bias, teacher_bias):
    d = make(23, 97, 12, 20, bias=bias, teacher_bias=teacher_bias)
    check(d, dict(temperature=1.0, hard_weight=0.5), chunk_size=5)
    d["labels"] = None
    check(d, dict(temperature=3.0, divergence="reverse_kl"), chunk_size=5)


@pytest.mark.parametrize("N,chunk", [(1, None), (1, 1), (17, 1), (17, 17), (17, 100), (64, None)])
def test_chunk_sizes_and_single_row(N, chunk):
    check(make(N, 83, 16, 8, seed=N), dict(temperature=2.0, hard_weight=0.3), chunk_size=chunk)


def test_empty_batch_and_all_ignored():
    d = make(0, 50, 8, 8)
    out, grads = run(fused_linear_kd_loss, d, torch.float32, dict(hard_weight=0.5))
    assert out.item() == 0.0 and grads[0].shape == (0, 8) and torch.all(grads[1] == 0)
    d = make(9, 50, 8, 8)
    d["labels"][:] = -100
    out, grads = run(fused_linear_kd_loss, d, torch.float32, dict(hard_weight=0.5), chunk_size=4)
    assert out.item() == 0.0 and all(torch.all(g == 0) for g in grads)


def test_leading_dims_noncontiguous_and_module():
    d = make(24, 71, 16, 12)
    # [B, S, H] hidden views that are not contiguous (transposed from [S, B, H]).
    sh = d["sh"].reshape(6, 4, 16).transpose(0, 1).detach().requires_grad_()
    th = d["th"].reshape(6, 4, 12).transpose(0, 1)
    lab = d["labels"].reshape(6, 4).t()
    sw = d["sw"].detach().requires_grad_()
    loss_fn = FusedLinearKDLoss(temperature=2.0, hard_weight=0.5, reduction="none", chunk_size=5)
    out = loss_fn(sh, sw, th, d["tw"], lab, student_bias=d["sb"], teacher_bias=d["tb"])
    assert out.shape == (4, 6)
    ref = fused_linear_kd_loss_reference(sh, sw, th, d["tw"], lab, student_bias=d["sb"], teacher_bias=d["tb"],
                                         temperature=2.0, hard_weight=0.5, reduction="none")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    go = torch.randn(4, 6)
    g = torch.autograd.grad(out, (sh, sw), go)
    gr = torch.autograd.grad(ref, (sh, sw), go)
    for a, b in zip(g, gr):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert "chunk_size=5" in repr(loss_fn)


def test_teacher_gets_no_gradient_and_frozen_weight():
    d = make(15, 40, 8, 8)
    th = d["th"].clone().requires_grad_()
    tw = d["tw"].clone().requires_grad_()
    sh = d["sh"].clone().requires_grad_()
    sw = d["sw"].clone()  # frozen student head (e.g. tied embeddings under LoRA)
    loss = fused_linear_kd_loss(sh, sw, th, tw, d["labels"], hard_weight=1.0, chunk_size=4)
    loss.backward()
    assert th.grad is None and tw.grad is None and sw.grad is None
    sh2 = d["sh"].clone().requires_grad_()
    ref = fused_linear_kd_loss_reference(sh2, sw, d["th"], d["tw"], d["labels"], hard_weight=1.0)
    ref.backward()
    torch.testing.assert_close(sh.grad, sh2.grad, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(fused_linear_kd_loss(sh, d["sw"], th, tw, d["labels"], hard_weight=1.0),
                                   loss.detach())


def test_reference_backend_small():
    d = make(11, 37, 8, 12)
    with kdfast.use_backend("reference"):
        check(d, dict(temperature=2.0, divergence="jsd", hard_weight=0.5, reduction="batchmean"), chunk_size=4)
        check(d, dict(temperature=2.0, divergence="kl", reduction="none"), chunk_size=4)


def test_default_chunk_size():
    assert default_chunk_size(30522) == 274 and default_chunk_size(128256) == 65
    assert default_chunk_size(2 ** 24) == 1


def _max_alloc_bytes(fn):
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max(e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0)


def test_never_allocates_full_logits():
    N, V, H = 512, 2000, 32
    d = make(N, V, H, H, bias=False, teacher_bias=False)
    sh, sw = d["sh"].requires_grad_(), d["sw"].requires_grad_()
    full = N * V * 4
    ours = _max_alloc_bytes(lambda: fused_linear_kd_loss(sh, sw, d["th"], d["tw"], d["labels"], hard_weight=0.5,
                                                         chunk_size=64).backward())
    # Largest op allocation: one [64, V] chunk of logit gradients plus the chunk's per-row
    # (soft, hard) terms and 4 statistics (8x below the full [N, V] logits).
    assert ours <= 64 * V * 4 + 64 * 6 * 4 < full
    # The measurement can fail: the materialising reference allocates the full logits.
    ref = _max_alloc_bytes(lambda: fused_linear_kd_loss_reference(sh, sw, d["th"], d["tw"], d["labels"],
                                                                  hard_weight=0.5).backward())
    assert ref >= full


def _op_args(d, reduction, need):
    return (d["sh"], d["sw"], d["sb"], d["th"], d["tw"], d["tb"], d["labels"], 2.0, 2, 0.3, 0.7, 0.4, -100,
            reduction, True, True, 4, need, "")


@pytest.mark.parametrize("reduction", [0, 3])
def test_opcheck(reduction):
    d = make(9, 31, 8, 6)
    for k in ("sh", "sw", "sb"):
        d[k].requires_grad_()
    torch.library.opcheck(torch.ops.kdfast.fused_linear_kd_fwd.default, _op_args(d, reduction, [True] * 3))
    torch.library.opcheck(torch.ops.kdfast.fused_linear_kd_fwd.default, _op_args(d, reduction, [True, False, True]))
    if reduction == 3:
        # The backward op takes plain (non-differentiable) inputs: no double backward.
        plain = {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in d.items()}
        bargs = _op_args(plain, reduction, [True] * 3)
        bargs = bargs[:7] + (torch.randn(9),) + bargs[7:13] + bargs[14:]
        torch.library.opcheck(torch.ops.kdfast.fused_linear_kd_bwd.default, bargs)


@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_torch_compile_fullgraph(reduction):
    d = make(21, 53, 8, 12)
    opts = dict(temperature=2.0, divergence="jsd", hard_weight=0.5, reduction=reduction, chunk_size=6)

    def step(sh, sw, sb, th, tw, tb, labels):
        loss = fused_linear_kd_loss(sh, sw, th, tw, labels, student_bias=sb, teacher_bias=tb, **opts)
        return loss.sum() * 1.3

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (step, compiled):
        leaves = [d[k].clone().requires_grad_() for k in ("sh", "sw", "sb")]
        out = fn(*leaves, d["th"], d["tw"], d["tb"], d["labels"])
        out.backward()
        results.append([out.detach()] + [x.grad for x in leaves])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_bad_inputs():
    d = make(6, 20, 8, 4)
    sh, sw, th, tw, lab = d["sh"], d["sw"], d["th"], d["tw"], d["labels"]
    with pytest.raises(ValueError, match=r"student_weight must be \[V, 8\]"):
        fused_linear_kd_loss(sh, sw[:, :5], th, tw)
    with pytest.raises(ValueError, match="teacher_weight must be"):
        fused_linear_kd_loss(sh, sw, th, tw[:, :3])
    with pytest.raises(ValueError, match="teacher_weight must have V=20"):
        fused_linear_kd_loss(sh, sw, th, tw[:19])
    with pytest.raises(ValueError, match="teacher_hidden leading dims"):
        fused_linear_kd_loss(sh, sw, th[:5], tw)
    with pytest.raises(TypeError, match="student_weight dtype"):
        fused_linear_kd_loss(sh, sw.bfloat16(), th, tw)
    with pytest.raises(TypeError, match="student_hidden must have dtype"):
        fused_linear_kd_loss(sh.long(), sw, th, tw)
    with pytest.raises(TypeError, match="student_bias must have dtype"):
        fused_linear_kd_loss(sh, sw, th, tw, student_bias=d["sb"].double())
    with pytest.raises(ValueError, match=r"teacher_bias must be \[20\]"):
        fused_linear_kd_loss(sh, sw, th, tw, teacher_bias=d["tb"][:3])
    with pytest.raises(ValueError, match="labels must be in"):
        fused_linear_kd_loss(sh, sw, th, tw, torch.full((6,), 20))
    with pytest.raises(ValueError, match="labels must have one entry per row"):
        fused_linear_kd_loss(sh, sw, th, tw, lab[:4])
    with pytest.raises(ValueError, match="chunk_size must be"):
        fused_linear_kd_loss(sh, sw, th, tw, chunk_size=0)
    with pytest.raises(ValueError, match="reduction must be"):
        fused_linear_kd_loss(sh, sw, th, tw, reduction="avg")
    with pytest.raises(ValueError, match="one device"):
        fused_linear_kd_loss(sh, sw, th.to("meta"), tw)
    with pytest.raises(ValueError, match="temperature"):
        FusedLinearKDLoss(temperature=0)


def test_float64_and_mixed_teacher_dtype():
    d = make(13, 45, 8, 10)
    # float64 runs the reference kd kernels, which (like kd_loss) work in float32.
    opts = dict(temperature=2.0, hard_weight=0.5, divergence="jsd")
    out, grads = run(fused_linear_kd_loss, d, torch.float64, opts, chunk_size=4)
    oracle, ograds = run(fused_linear_kd_loss_reference, d, torch.float64, opts)
    assert out.dtype == torch.float32 and all(g.dtype == torch.float64 for g in grads)
    torch.testing.assert_close(out.double(), oracle, rtol=1e-5, atol=1e-5)
    for g, og in zip(grads, ograds):
        torch.testing.assert_close(g, og, rtol=1e-4, atol=1e-5)
    # bf16 teacher (e.g. a frozen half-precision model) with an fp32 student.
    sh, sw = d["sh"].clone().requires_grad_(), d["sw"].clone().requires_grad_()
    th, tw, tb = d["th"].bfloat16(), d["tw"].bfloat16(), d["tb"].bfloat16()
    out = fused_linear_kd_loss(sh, sw, th, tw, d["labels"], student_bias=d["sb"], teacher_bias=tb, temperature=2.0,
                               hard_weight=0.5, chunk_size=4)
    ref = fused_linear_kd_loss_reference(sh, sw, th, tw, d["labels"], student_bias=d["sb"], teacher_bias=tb,
                                         temperature=2.0, hard_weight=0.5)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    g, gr = torch.autograd.grad(out, sw), torch.autograd.grad(ref, sw)
    torch.testing.assert_close(g, gr, rtol=1e-4, atol=1e-5)
