"""qa_kd_loss against its float64 reference and against the HF/DistilBERT formula."""
import pytest
import torch
import torch.nn.functional as F

import kdfast
from kdfast.nn import QAKDLoss
from kdfast.ops import qa_kd_loss, qa_kd_loss_reference
from tests.numerics import assert_close_to_oracle

pytestmark = pytest.mark.cpu


def make(B, L, seed=0, scale=10.0):
    g = torch.Generator().manual_seed(seed)
    logits = [torch.randn(B, L, generator=g) * scale for _ in range(4)]
    sp = torch.randint(0, L, (B,), generator=g)
    ep = torch.randint(0, L, (B,), generator=g)
    return logits, sp, ep


def run(fn, logits, sp, ep, dtype, go, **kw):
    ss, se = (x.detach().to(dtype).requires_grad_() for x in logits[:2])
    ts, te = (x.to(dtype) for x in logits[2:])
    out = fn(ss, se, ts, te, sp, ep, **kw)
    gs, ge = torch.autograd.grad(out, (ss, se), torch.tensor(go, dtype=out.dtype))
    return out, gs, ge


def check(logits, sp, ep, dtype=torch.float32, **kw):
    out, *g = run(qa_kd_loss, logits, sp, ep, dtype, 1.7, **kw)
    oracle, *og = run(qa_kd_loss_reference, logits, sp, ep, torch.float64, 1.7, **kw)
    tref, *tg = run(qa_kd_loss_reference, logits, sp, ep, dtype, 1.7, **kw)
    assert out.dtype == torch.float32 and out.shape == ()
    assert torch.isfinite(out)
    assert_close_to_oracle(out, oracle, tref, dtype, what="loss")
    for name, a, b, c in zip(("grad start", "grad end"), g, og, tg):
        assert a.dtype == dtype
        assert_close_to_oracle(a, b, c, dtype, what=name)
    return out


def padded_mask(B, L, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(L // 2, L + 1, (B,), generator=g)
    return (torch.arange(L) < lengths[:, None]).long()


@pytest.mark.parametrize("T", [1.0, 2.0, 4.0])
@pytest.mark.parametrize("masked", [False, True])
def test_matches_oracle(T, masked):
    B, L = 7, 97
    logits, sp, ep = make(B, L, seed=int(T))
    sp[2], ep[4] = L + 5, L  # outside the sequence: ignored
    sp[5] = -3  # negative: HF clamps to 0 (counted)
    kw = dict(temperature=T, soft_weight=0.6, hard_weight=0.4)
    if masked:
        kw["mask"] = padded_mask(B, L, seed=int(T))
    check(logits, sp, ep, **kw)


def test_matches_hf_formula():
    """No mask: the DistilBERT/HF SQuAD recipe written with F.kl_div and F.cross_entropy(ignore_index=L)."""
    B, L, T = 6, 50, 2.0
    logits, sp, ep = make(B, L, seed=3)
    sp[0], ep[1], sp[3] = 50, 77, -4
    ss, se, ts, te = (x.double() for x in logits)

    def term(s, t, pos):
        kl = F.kl_div(F.log_softmax(s / T, -1), F.softmax(t / T, -1), reduction="batchmean")
        ce = F.cross_entropy(s, pos.clamp(0, L), ignore_index=L)
        return 0.3 * T * T * kl + 0.7 * ce

    expected = (term(ss, ts, sp) + term(se, te, ep)) / 2
    got = qa_kd_loss(*logits, sp, ep, temperature=T, soft_weight=0.3, hard_weight=0.7)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    # [B, 1] positions (as some HF pipelines pass them) give the same result.
    got2 = qa_kd_loss(*logits, sp[:, None], ep[:, None], temperature=T, soft_weight=0.3, hard_weight=0.7)
    torch.testing.assert_close(got2, got)


def test_masked_positions_take_no_mass():
    B, L = 4, 40
    logits, sp, ep = make(B, L, seed=5)
    mask = padded_mask(B, L, seed=5)
    mask[0, 20:] = 0
    base = qa_kd_loss(*logits, sp.clamp(max=19), ep.clamp(max=19), mask=mask)
    # Changing logits at masked positions changes nothing, and their gradient is zero.
    changed = [torch.where(mask.bool(), x, x * 100 + 7) for x in logits]
    ss = changed[0].clone().requires_grad_()
    out = qa_kd_loss(ss, *changed[1:], sp.clamp(max=19), ep.clamp(max=19), mask=mask)
    torch.testing.assert_close(out, base)
    out.backward()
    assert torch.all(ss.grad[mask == 0] == 0)


def test_positions_on_masked_tokens_and_dead_rows():
    B, L = 5, 30
    logits, sp, ep = make(B, L, seed=7)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[1, 10:] = False
    mask[3] = False  # a fully padded sequence: contributes nothing, no NaN
    sp[1], ep[1] = 15, 25  # gold positions on padding: ignored (CE would be infinite)
    out = check(logits, sp, ep, mask=mask, temperature=2.0)
    assert torch.isfinite(out)


def test_no_positions_and_hard_weight_zero():
    logits, sp, ep = make(6, 33, seed=11)
    a = check(logits, None, None, temperature=3.0)
    b = check(logits, sp, ep, temperature=3.0, hard_weight=0.0)
    torch.testing.assert_close(a, b)


def test_all_positions_ignored_gives_soft_only():
    B, L = 4, 21
    logits, sp, ep = make(B, L, seed=2)
    out = check(logits, torch.full((B,), L), torch.full((B,), L + 3), temperature=2.0)
    soft_only = qa_kd_loss(*logits, temperature=2.0)
    torch.testing.assert_close(out, soft_only)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(dtype):
    B, L = 8, 384
    logits, sp, ep = make(B, L, seed=13)
    check(logits, sp, ep, dtype, mask=padded_mask(B, L, seed=13), temperature=2.0)


def test_single_sequence_and_module():
    logits, sp, ep = make(1, 17, seed=4)
    loss_fn = QAKDLoss(temperature=2.0, soft_weight=0.5, hard_weight=0.5)
    out = loss_fn(*logits, sp, ep)
    ref = qa_kd_loss_reference(*(x.double() for x in logits), sp, ep)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    assert "temperature=2.0" in repr(loss_fn)


def test_teacher_gets_no_gradient_and_noncontiguous():
    B, L = 5, 26
    logits, sp, ep = make(B, L, seed=8)
    # Non-contiguous views: columns of a [B, L, 2] QA head output.
    ss_se = torch.stack(logits[:2], -1).requires_grad_()
    ts_te = torch.stack(logits[2:], -1).requires_grad_()
    out = qa_kd_loss(ss_se[..., 0], ss_se[..., 1], ts_te[..., 0], ts_te[..., 1], sp, ep)
    out.backward()
    assert ts_te.grad is None and ss_se.grad is not None
    ref = qa_kd_loss_reference(*(x.double() for x in logits), sp, ep)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_reference_backend_small():
    B, L = 3, 19
    logits, sp, ep = make(B, L, seed=9)
    sp[0] = L
    with kdfast.use_backend("reference"):
        check(logits, sp, ep, mask=padded_mask(B, L), temperature=2.0)


def test_torch_compile_fullgraph_and_opcheck():
    B, L = 4, 29
    logits, sp, ep = make(B, L, seed=10)
    sp[1] = L + 2
    mask = padded_mask(B, L, seed=10)

    def step(ss, se, ts, te, sp, ep, mask):
        return qa_kd_loss(ss, se, ts, te, sp, ep, mask=mask, temperature=2.0) * 1.5

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (step, compiled):
        ss, se = (x.clone().requires_grad_() for x in logits[:2])
        out = fn(ss, se, *logits[2:], sp, ep, mask)
        out.backward()
        results.append((out.detach(), ss.grad, se.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # The kernel op on the stacked, masked [2B, L] rows qa_kd_loss builds.
    keep = mask.bool().repeat(2, 1)
    s = torch.cat(logits[:2]).masked_fill(~keep, float("-inf")).requires_grad_()
    t = torch.cat(logits[2:]).masked_fill(~keep, float("-inf"))
    labels = torch.cat([sp, ep]).clamp(max=L - 1)
    torch.library.opcheck(torch.ops.kdfast.kd_loss_fwd.default, (s, t, labels, 2.0, 0, 0.5, -100, True, ""))


def test_bad_inputs():
    logits, sp, ep = make(3, 10)
    ss, se, ts, te = logits
    with pytest.raises(ValueError, match="teacher_end must have the shape"):
        qa_kd_loss(ss, se, ts, te[:, :9])
    with pytest.raises(ValueError, match="student_start must be 2-D"):
        qa_kd_loss(ss[0], se[0], ts[0], te[0])
    with pytest.raises(TypeError, match="student_end must have dtype"):
        qa_kd_loss(ss, se.long(), ts, te)
    with pytest.raises(ValueError, match="given together"):
        qa_kd_loss(ss, se, ts, te, sp, None)
    with pytest.raises(TypeError, match="start_positions must have dtype"):
        qa_kd_loss(ss, se, ts, te, sp.float(), ep)
    with pytest.raises(ValueError, match=r"end_positions must have shape \[B\]"):
        qa_kd_loss(ss, se, ts, te, sp, ep[:2])
    with pytest.raises(ValueError, match="mask must have shape"):
        qa_kd_loss(ss, se, ts, te, mask=torch.ones(3, 11))
    with pytest.raises(ValueError, match="temperature"):
        qa_kd_loss(ss, se, ts, te, temperature=-1.0)
    with pytest.raises(ValueError, match="one device"):
        qa_kd_loss(ss, se, ts.to("meta"), te)
    with pytest.raises(ValueError, match="temperature"):
        QAKDLoss(temperature=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_cpu_path_unit_grad_and_second_backward(dtype):
    # The CPU path computes the gradient in the forward: grad_output = 1 returns it as is, a
    # second backward through the graph (retain_graph) recomputes it.
    B, L = 6, 53
    logits, sp, ep = make(B, L, seed=41)
    sp[1] = L
    kw = dict(temperature=2.0, soft_weight=0.7, hard_weight=0.3, mask=padded_mask(B, L, seed=3))
    ss, se = (x.detach().to(dtype).requires_grad_() for x in logits[:2])
    ts, te = (x.to(dtype) for x in logits[2:])
    with kdfast.use_backend("cpu"):
        out = qa_kd_loss(ss, se, ts, te, sp, ep, **kw)
    assert "_QAKDFusedCPU" in type(out.grad_fn).__name__
    g1 = torch.autograd.grad(out, (ss, se), retain_graph=True)
    g2 = torch.autograd.grad(out, (ss, se), torch.tensor(0.5))
    oracle, *og = run(qa_kd_loss_reference, logits, sp, ep, torch.float64, 1.0, **kw)
    tref, *tg = run(qa_kd_loss_reference, logits, sp, ep, dtype, 1.0, **kw)
    for a, b, c, half in zip(g1, og, tg, g2):
        assert_close_to_oracle(a, b, c, dtype, what="grad")
        assert torch.allclose(half.double() * 2, a.double(), rtol=1e-2 if dtype == torch.bfloat16 else 1e-5,
                              atol=1e-6)


def test_mask_dtypes_and_old_keyword():
    B, L = 4, 23
    logits, sp, ep = make(B, L, seed=14)
    keep = padded_mask(B, L, seed=14).bool()
    want = qa_kd_loss(*logits, sp, ep, keep, temperature=2.0)
    for m in (keep.long(), keep.int(), keep.float(), keep.double()):
        torch.testing.assert_close(qa_kd_loss(*logits, sp, ep, m, temperature=2.0), want, rtol=0, atol=0)
        torch.testing.assert_close(QAKDLoss(temperature=2.0)(*logits, sp, ep, mask=m),
                                   QAKDLoss(temperature=2.0)(*logits, sp, ep, keep), rtol=0, atol=0)
    # attention_mask= (the old name) still works for one release, with a DeprecationWarning.
    for fn in (qa_kd_loss, qa_kd_loss_reference, QAKDLoss(temperature=2.0)):
        with pytest.warns(DeprecationWarning, match="attention_mask= is renamed mask="):
            old = fn(*logits, sp, ep, attention_mask=keep, **({} if isinstance(fn, QAKDLoss) else
                                                               {"temperature": 2.0}))
        torch.testing.assert_close(old.float(), fn(*logits, sp, ep, mask=keep, **(
            {} if isinstance(fn, QAKDLoss) else {"temperature": 2.0})).float(), rtol=0, atol=0)
    with pytest.raises(TypeError, match="both 'mask' and its old name 'attention_mask'"):
        qa_kd_loss(*logits, sp, ep, mask=keep, attention_mask=keep)
