"""Triton kd_loss kernels vs the float64 oracle, run on CPU tensors under
TRITON_INTERPRET=1 (tests/conftest.py sets it) at small shapes."""
import math

import pytest
import torch

import kdfast
from kdfast.ops.kd_loss import kd_loss, kd_rows_reference
from tests.kernels.kd_loss_cases import check_against_oracle, make_inputs

# The interpreter evaluates both sides of tl.where in numpy: -inf arithmetic on masked lanes warns.
pytestmark = [pytest.mark.triton, pytest.mark.filterwarnings("ignore::RuntimeWarning")]

DIVS = ("kl", "reverse_kl", "jsd")


def _kernels():
    from kdfast.kernels.triton import kd_loss as k
    return k


@pytest.mark.parametrize("divergence", DIVS)
@pytest.mark.parametrize("temperature", (1.0, 2.0, 4.0))
def test_matches_oracle(divergence, temperature):
    s, t, labels = make_inputs(8, 1271, teacher_holes=divergence != "reverse_kl")
    check_against_oracle("triton", s, t, labels, divergence=divergence, temperature=temperature)


@pytest.mark.parametrize("divergence", DIVS)
def test_bf16_and_mixed_dtypes(divergence):
    s, t, labels = make_inputs(8, 1271, torch.bfloat16, teacher_holes=divergence != "reverse_kl", seed=3)
    check_against_oracle("triton", s, t, labels, divergence=divergence, temperature=2.0)
    # fp16 student with a bf16 teacher: the kernel reads each side in its own dtype.
    s16 = s.to(torch.float16)
    check_against_oracle("triton", s16, t, labels, divergence=divergence, temperature=2.0)


@pytest.mark.parametrize("divergence", DIVS)
def test_several_blocks_and_row_strides(divergence):
    # V = 5000 spans two 4096-wide blocks plus a tail; rows are views of wider buffers.
    s, t, labels = make_inputs(6, 5000, teacher_holes=divergence != "reverse_kl", row_pad=3, seed=5)
    assert not s.is_contiguous() and s.stride(1) == 1
    check_against_oracle("triton", s, t, labels, divergence=divergence, temperature=2.0)


@pytest.mark.parametrize("divergence", DIVS)
def test_small_blocks_online_rescale(divergence):
    # Ascending logits make the running max grow in every block: exercises the online rescaling.
    k = _kernels()
    s, t, labels = make_inputs(6, 1271, teacher_holes=divergence != "reverse_kl", seed=7)
    ramp = torch.linspace(0, 40, 1271)
    s, t = s + ramp, t + ramp.flip(0)
    code = DIVS.index(divergence)
    rows, stats = k.kd_loss_fwd(s, t, labels, 2.0, code, 0.5, -100, True, block=128)
    ref = kd_rows_reference(s.double(), t.double(), labels, temperature=2.0, divergence=divergence, beta=0.5)
    fin = torch.isfinite(ref)
    assert torch.equal(fin, torch.isfinite(rows))
    torch.testing.assert_close(rows.double()[fin], ref[fin], rtol=1e-5, atol=1e-4)
    rows_1, stats_1 = k.kd_loss_fwd(s, t, labels, 2.0, code, 0.5, -100, True)
    torch.testing.assert_close(stats, stats_1, rtol=1e-5, atol=1e-4)
    gr = torch.randn(6, 2)
    g = k.kd_loss_bwd(s, t, labels, stats, gr, 2.0, code, 0.5, -100, True, block=128)
    g1 = k.kd_loss_bwd(s, t, labels, stats, gr, 2.0, code, 0.5, -100, True)
    torch.testing.assert_close(g, g1, rtol=1e-5, atol=1e-6)


def test_stats_contract():
    """stats = (lse(s/T), lse(t/T), lse(s), aux) with -inf for ignored rows, as the op and CPU kernel define."""
    k = _kernels()
    s, t, labels = make_inputs(6, 300, masks=False, seed=11)
    T = 2.0
    for code in range(3):
        rows, stats = k.kd_loss_fwd(s, t, labels, T, code, 0.5, -100, True)
        keep = labels != -100
        torch.testing.assert_close(stats[keep, 0], torch.logsumexp(s / T, -1)[keep])
        torch.testing.assert_close(stats[keep, 1], torch.logsumexp(t / T, -1)[keep])
        torch.testing.assert_close(stats[keep, 2], torch.logsumexp(s, -1)[keep])
        assert torch.all(stats[~keep] == -math.inf) and torch.all(rows[~keep] == 0)
        ps = torch.softmax(s.double() / T, -1)
        if code == 0:
            assert torch.all(stats[keep, 3] == 0)
        elif code == 1:
            aux = (ps * (s.double() - t.double()) / T).sum(-1)
            torch.testing.assert_close(stats[keep, 3].double(), aux[keep], rtol=1e-5, atol=1e-4)
        else:
            pt = torch.softmax(t.double() / T, -1)
            m = 0.5 * ps + 0.5 * pt
            aux = (ps * (ps.log() - m.log())).sum(-1)
            torch.testing.assert_close(stats[keep, 3].double(), aux[keep], rtol=1e-5, atol=1e-5)
    # Without the hard term stats[:, 2] is lse(s / T), like the CPU kernel.
    _, stats = k.kd_loss_fwd(s, t, None, T, 0, 0.5, -100, False)
    torch.testing.assert_close(stats[:, 2], stats[:, 0])


@pytest.mark.parametrize("N", (0, 1))
def test_tiny_batches(N):
    s, t, labels = make_inputs(N, 1271, ignored=False)
    check_against_oracle("triton", s, t, labels, divergence="jsd", temperature=2.0)
    with kdfast.use_backend("triton"):
        loss = kd_loss(s.requires_grad_(), t, temperature=2.0)
    assert loss.shape == () and torch.isfinite(loss)


def test_no_labels_and_weights():
    s, t, _ = make_inputs(8, 1271, seed=13)
    check_against_oracle("triton", s, t, None, divergence="kl", temperature=4.0, hard_weight=0.0)


def test_fully_masked_rows_give_zero_not_nan():
    s = torch.full((3, 700), -math.inf)
    t = torch.full((3, 700), -math.inf)
    s[0], t[0] = torch.randn(700) * 10, torch.randn(700) * 10
    with kdfast.use_backend("triton"):
        for div in DIVS:
            x = s.clone().requires_grad_()
            loss = kd_loss(x, t, divergence=div, temperature=2.0, reduction="sum")
            loss.backward()
            assert torch.isfinite(loss) and torch.all(x.grad[1:] == 0) and torch.isfinite(x.grad).all()


def test_nan_in_nan_out():
    k = _kernels()
    s, t, labels = make_inputs(3, 500, masks=False, ignored=False)
    s[1, 17] = math.nan
    t[2, 400] = math.inf
    for code in range(3):
        rows, stats = k.kd_loss_fwd(s, t, labels, 1.0, code, 0.5, -100, True)
        assert torch.isfinite(rows[0]).all() and torch.isnan(rows[1:]).all() and torch.isnan(stats[1:]).all()


def test_zero_soft_grad_is_exact_zero():
    # A row with an infinite soft term (student fully masked, teacher not) and grad 0 on it gives 0, not NaN.
    k = _kernels()
    s = torch.full((1, 50), -math.inf)
    t = torch.randn(1, 50)
    rows, stats = k.kd_loss_fwd(s, t, None, 1.0, 0, 0.5, -100, False)
    assert rows[0, 0] == math.inf
    g = k.kd_loss_bwd(s, t, None, stats, torch.zeros(1, 2), 1.0, 0, 0.5, -100, False)
    assert torch.all(g == 0)


def test_bad_kernel_inputs():
    k = _kernels()
    s = torch.randn(4, 10)
    with pytest.raises(ValueError, match="equal 2-D"):
        k.kd_loss_fwd(s, torch.randn(4, 11), None, 1.0, 0, 0.5, -100, False)
    with pytest.raises(TypeError, match="dtype"):
        k.kd_loss_fwd(s.double(), s.double(), None, 1.0, 0, 0.5, -100, False)
    with pytest.raises(ValueError, match="unit stride"):
        k.kd_loss_fwd(s.t(), s.t(), None, 1.0, 0, 0.5, -100, False)
    with pytest.raises(ValueError, match="int64"):
        k.kd_loss_fwd(s, s, torch.zeros(4, dtype=torch.int32), 1.0, 0, 0.5, -100, True)


@pytest.mark.cpu
def test_same_rows_and_stats_as_cpu_kernel():
    """The Triton and CPU kernels share one stats contract (the backward of either reads them)."""
    k = _kernels()
    for code in range(3):
        s, t, labels = make_inputs(8, 1271, seed=17, teacher_holes=code != 1)
        r_c, st_c = torch.ops.kdfast_C.kd_loss_fwd(s, t, labels, 2.0, code, 0.5, -100, True)
        r_t, st_t = k.kd_loss_fwd(s, t, labels, 2.0, code, 0.5, -100, True)
        torch.testing.assert_close(st_t, st_c, rtol=1e-5, atol=1e-4)
        live = torch.isfinite(r_c)
        torch.testing.assert_close(r_t[live], r_c[live], rtol=1e-5, atol=1e-4)
        gr = torch.randn(8, 2)
        g_c = torch.ops.kdfast_C.kd_loss_bwd(s, t, labels, st_c, gr, 2.0, code, 0.5, -100, True)
        g_t = k.kd_loss_bwd(s, t, labels, st_t, gr, 2.0, code, 0.5, -100, True)
        torch.testing.assert_close(g_t, g_c, rtol=1e-4, atol=1e-6)


def test_opcheck_with_triton_backend():
    s, t, labels = make_inputs(5, 300, seed=19)
    s.requires_grad_()
    torch.library.opcheck(torch.ops.kdfast.kd_loss_fwd.default, (s, t, labels, 2.0, 2, 0.5, -100, True, "triton"))
    _, stats = torch.ops.kdfast.kd_loss_fwd(s.detach(), t, labels, 2.0, 2, 0.5, -100, True, "triton")
    torch.library.opcheck(torch.ops.kdfast.kd_loss_bwd.default,
                          (s.detach(), t, labels, stats, torch.randn(5, 2), 2.0, 2, 0.5, -100, True, "triton"))


@pytest.mark.parametrize("divergence", DIVS)
def test_labels_without_hard_term(divergence):
    # Labels only mark ignored rows; the kernel skips the cross-entropy work.
    s, t, labels = make_inputs(8, 1271, teacher_holes=divergence != "reverse_kl", seed=23)
    check_against_oracle("triton", s, t, labels, divergence=divergence, temperature=2.0, hard_weight=0.0)
