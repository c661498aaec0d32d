"""q/k/v capture on the kdfast attention, and LayerKD on captured tensors equal to the
eager ``output_attentions=True`` computation (BertForQuestionAnswering, random init)."""
import pytest
import torch
import torch.nn.functional as F

import kdfast.hf  # noqa: F401  (registers the "kdfast" attention)
from kdfast.hf.capture import capture
from kdfast.nn import LayerKD

transformers = pytest.importorskip("transformers")
from transformers import BertConfig, BertForQuestionAnswering  # noqa: E402

STUDENT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
TEACHER = dict(hidden_size=48, num_hidden_layers=4, num_attention_heads=4, intermediate_size=96)


def _model(impl, seed, **kw):
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=101, max_position_embeddings=64, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0, **kw)
    return BertForQuestionAnswering._from_config(cfg, attn_implementation=impl).eval()


def _batch(B=3, L=19):
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 101, (B, L), generator=g)
    am = torch.ones(B, L, dtype=torch.long)
    for b, n in enumerate([L, 11, 2][:B]):
        am[b, n:] = 0
    return ids, am


def _split(x, H):
    B, L, D = x.shape
    return x.view(B, L, H, D // H).transpose(1, 2)


def test_captured_qkv_are_the_layer_projections():
    ids, am = _batch()
    model = _model("kdfast", 0, **STUDENT)
    with capture(model) as cap:
        out = model(input_ids=ids, attention_mask=am, output_hidden_states=True)
    assert len(cap.layers) == STUDENT["num_hidden_layers"]
    assert torch.equal(cap.mask, am.bool())
    H = STUDENT["num_attention_heads"]
    for i, (q, k, v) in enumerate(cap.layers):
        attn = model.bert.encoder.layer[i].attention.self
        h = out.hidden_states[i]
        for name, got in (("query", q), ("key", k), ("value", v)):
            want = _split(getattr(attn, name)(h), H)
            assert got.shape == want.shape
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        assert q.requires_grad  # the student's graph reaches its projections
    # After the context: no more recording, tensors stay until the next step.
    model(input_ids=ids, attention_mask=am)
    assert len(cap.layers) == STUDENT["num_hidden_layers"]
    cap.clear()
    assert cap.layers == []


def test_student_and_teacher_captured_together():
    ids, am = _batch()
    s, t = _model("kdfast", 0, **STUDENT), _model("kdfast", 1, **TEACHER)
    with capture(s) as cs, capture(t) as ct:
        s(input_ids=ids, attention_mask=am)
        with torch.no_grad():
            t(input_ids=ids, attention_mask=am)
    assert len(cs) == 2 and len(ct) == 4
    assert cs.layers[0][0].shape[-1] == 8 and ct.layers[0][0].shape[-1] == 12
    assert not ct.layers[0][0].requires_grad
    with pytest.raises(TypeError, match="torch.nn.Module"):
        capture("model")


def _eager_terms(kd, s_out, t_out, s_model, t_model, am):
    """The same terms from eager output_attentions maps (materialised, autograd through PyTorch)."""
    keep = am.bool()
    n = keep.sum()
    pair = keep[:, None, :, None] & keep[:, None, None, :]
    H = STUDENT["num_attention_heads"]
    W, b = kd.hidden_proj[0].weight, kd.hidden_proj[0].bias
    We, be = kd.embedding_proj.weight, kd.embedding_proj.bias

    def mse(y, t):
        return ((y - t) ** 2)[keep].sum() / (n * t.shape[-1])

    terms = {"embedding": mse(F.linear(s_out.hidden_states[0], We, be), t_out.hidden_states[0])}
    terms["hidden"] = sum(mse(F.linear(s_out.hidden_states[s], W, b), t_out.hidden_states[t]) for s, t in kd.pairs)
    kl = score = value = 0
    for s, t in kd.pairs:
        p_s, p_t = s_out.attentions[s - 1], t_out.attentions[t - 1]
        rows = torch.where(pair, p_t * (torch.log(p_t.clamp_min(1e-30)) - torch.log(p_s.clamp_min(1e-30))), 0.0)
        kl = kl + rows.sum() / (H * n)
        sa = s_model.bert.encoder.layer[s - 1].attention.self
        ta = t_model.bert.encoder.layer[t - 1].attention.self
        hs, ht = s_out.hidden_states[s - 1], t_out.hidden_states[t - 1]
        qs, ks, vs = (_split(getattr(sa, x)(hs), H) for x in ("query", "key", "value"))
        qt, kt, vt = (_split(getattr(ta, x)(ht), H) for x in ("query", "key", "value"))
        ss = qs @ ks.transpose(-1, -2) * sa.scaling
        st = qt @ kt.transpose(-1, -2) * ta.scaling
        score = score + torch.where(pair, (ss - st) ** 2, 0.0).sum() / (H * (keep.sum(1) ** 2).sum())
        vls = torch.log_softmax((vs @ vs.transpose(-1, -2) * sa.scaling).masked_fill(~keep[:, None, None], -1e30), -1)
        vlt = torch.log_softmax((vt @ vt.transpose(-1, -2) * ta.scaling).masked_fill(~keep[:, None, None], -1e30), -1)
        value = value + torch.where(pair, vlt.exp() * (vlt - vls), 0.0).sum() / (H * n)
    terms.update(attention_kl=kl, attention_score=score, value_relation=value)
    return terms


def test_layer_kd_on_capture_equals_eager_output_attentions():
    ids, am = _batch()
    weights = {"embedding": 1.0, "hidden": 0.5, "attention_kl": 2.0, "attention_score": 0.1, "value_relation": 1.0}
    kd = LayerKD(BertConfig(**STUDENT), BertConfig(**TEACHER), mapping="uniform", losses=weights)
    assert kd.pairs == [(1, 2), (2, 4)]
    # kdfast attention + capture (no maps)
    s, t = _model("kdfast", 0, **STUDENT), _model("kdfast", 1, **TEACHER)
    with capture(s) as cs, capture(t) as ct:
        s_out = s(input_ids=ids, attention_mask=am, output_hidden_states=True)
        with torch.no_grad():
            t_out = t(input_ids=ids, attention_mask=am, output_hidden_states=True)
    total, terms = kd(s_out.hidden_states, cs.layers, t_out.hidden_states, ct.layers, am)
    total.backward()
    g_fast = s.bert.encoder.layer[0].attention.self.query.weight.grad.clone()
    # eager attention with output_attentions=True (same weights)
    se, te = _model("eager", 0, **STUDENT), _model("eager", 1, **TEACHER)
    se_out = se(input_ids=ids, attention_mask=am, output_hidden_states=True, output_attentions=True)
    with torch.no_grad():
        te_out = te(input_ids=ids, attention_mask=am, output_hidden_states=True, output_attentions=True)
    eager = _eager_terms(kd, se_out, te_out, se, te, am)
    for name in weights:
        torch.testing.assert_close(terms[name], eager[name].float(), rtol=2e-4, atol=1e-6, msg=name)
    eager_total = sum(weights[n] * eager[n] for n in weights)
    torch.testing.assert_close(total, eager_total, rtol=2e-4, atol=1e-6)
    eager_total.backward()
    g_eager = se.bert.encoder.layer[0].attention.self.query.weight.grad
    torch.testing.assert_close(g_fast, g_eager, rtol=1e-3, atol=1e-5)


def test_capture_keeps_only_the_layers_and_tensors_asked_for():
    ids, am = _batch()
    weights = {"hidden": 1.0, "attention_kl": 1.0, "attention_score": 0.5}
    kd = LayerKD(BertConfig(**STUDENT), BertConfig(**TEACHER), mapping="uniform", losses=weights)
    args = kd.capture_args("teacher")
    assert args == {"layers": [1, 3], "keep": "qk"}
    assert kd.capture_args("student") == {"layers": [0, 1], "keep": "qk"}
    s, t = _model("kdfast", 0, **STUDENT), _model("kdfast", 1, **TEACHER)
    totals = []
    for targs in ({}, args):
        with capture(s) as cs, capture(t, **targs) as ct:
            s_out = s(input_ids=ids, attention_mask=am, output_hidden_states=True)
            with torch.no_grad():
                t_out = t(input_ids=ids, attention_mask=am, output_hidden_states=True)
        totals.append(kd(s_out.hidden_states, cs.layers, t_out.hidden_states, ct.layers, am)[0])
    torch.testing.assert_close(totals[0], totals[1], rtol=0, atol=0)
    # One position per layer; unused layers and v are not kept.
    assert len(ct.layers) == TEACHER["num_hidden_layers"]
    assert ct.layers[0] is None and ct.layers[2] is None
    q, k, v = ct.layers[1]
    assert q is not None and k is not None and v is None
    # value_relation needs v: a clear error, and capture_args asks for it.
    kv = LayerKD(BertConfig(**STUDENT), BertConfig(**TEACHER), mapping="uniform", losses={"value_relation": 1.0})
    with pytest.raises(ValueError, match="has no v"):
        kv(None, None, cs.layers, ct.layers, attention_mask=am)
    assert kv.capture_args("teacher")["keep"] == "v"
    short = LayerKD(BertConfig(**STUDENT), BertConfig(**TEACHER), mapping=[1, 3], losses={"attention_kl": 1.0})
    with pytest.raises(ValueError, match="did not keep this layer"):
        short(None, None, cs.layers, ct.layers, attention_mask=am)  # teacher layer 1 (index 0) was dropped
    with pytest.raises(ValueError, match="keep must name"):
        capture(t, keep="qx")
    with pytest.raises(ValueError, match="0-based"):
        capture(t, layers=[-1])
    with pytest.raises(TypeError, match="iterable of 0-based"):
        capture(t, layers=3)
    with pytest.raises(ValueError, match="side must be"):
        kd.capture_args("both")
