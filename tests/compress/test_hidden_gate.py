"""The CoFi hidden-dimension gate: gated LayerNorm, gated model, expected size, compaction, save/load."""
import pytest
import torch
import torch.nn.functional as F

import kdfast.hf  # noqa: F401  (registers the kdfast attention)
import kdfast.compress as kc
from kdfast.compress.hidden import GatedLayerNorm, HiddenMask
from tests.numerics import assert_close_to_oracle
from transformers import (AutoModelForMaskedLM, AutoModelForQuestionAnswering, AutoModelForSequenceClassification,
                          AutoModelForTokenClassification, BertConfig)

D, H, FF, NL = 96, 6, 160, 4


def _cfg():
    return BertConfig(vocab_size=211, hidden_size=D, num_hidden_layers=NL, num_attention_heads=H,
                      intermediate_size=FF, max_position_embeddings=128)


def _model(impl="kdfast", seed=0, cls=AutoModelForQuestionAnswering):
    torch.manual_seed(seed)
    return cls.from_config(_cfg(), attn_implementation=impl)


def _batch():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 211, (3, 45), generator=g)
    am = torch.ones(3, 45, dtype=torch.long)
    am[1, 30:] = 0
    am[2, 9:] = 0
    return ids, am


def _hidden_log_alpha():
    la = torch.randn(D, generator=torch.Generator().manual_seed(11)) * 3
    la[:4] = -10.0   # surely pruned
    la[4:8] = 10.0   # surely kept at exactly 1
    return la


def _set_gates(gates):
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for hg in gates.head:
            hg.log_alpha.copy_(torch.randn(H, generator=g) * 3)
        if len(gates.head):
            gates.head[0].log_alpha.copy_(torch.tensor([5.0, -9, 5, -9, -9, 0.3]))
            gates.head[2].log_alpha.fill_(-10.0)  # fully pruned attention
        for fg in gates.ffn:
            fg.log_alpha.copy_(torch.randn(FF, generator=g) * 3)
        if len(gates.ffn):
            gates.ffn[3].log_alpha.fill_(-10.0)  # fully pruned FFN
        gates.hidden.log_alpha.copy_(_hidden_log_alpha())


def _run(model, ids, am, **kw):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=am, **kw)


# --- the gated LayerNorm ---------------------------------------------------------------------------------------

def _oracle_ln(x, w, b, z, eps):
    """float64: LayerNorm of the kept dims only, times the gate; 0 in pruned dims."""
    x, w, b, z = (t.double() for t in (x, w, b, z))
    k = z != 0
    out = torch.zeros_like(x)
    xk = x[..., k]
    mu = xk.mean(-1, keepdim=True)
    var = ((xk - mu) ** 2).mean(-1, keepdim=True)
    out[..., k] = ((xk - mu) / torch.sqrt(var + eps) * w[k] + b[k]) * z[k]
    return out


def _gated_ln(n, z, seed=0):
    torch.manual_seed(seed)
    ln = torch.nn.LayerNorm(n, eps=1e-5)
    with torch.no_grad():
        ln.weight.copy_(torch.randn(n) * 2)
        ln.bias.copy_(torch.randn(n))
    return GatedLayerNorm(ln, HiddenMask(lambda: z)), ln


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gated_layernorm_vs_float64(dtype):
    n = 37
    z = torch.rand(n, generator=torch.Generator().manual_seed(1))
    z[[0, 5, 6, 20, 36]] = 0.0
    z[[1, 2]] = 1.0
    z = z.requires_grad_()
    gln, _ = _gated_ln(n, z)
    x = (torch.randn(5, n, 7) * 10 + 3).transpose(1, 2).to(dtype).requires_grad_()  # non-contiguous
    out = gln(x)
    assert out.dtype == dtype and out.shape == x.shape
    assert torch.all(out[..., z.detach() == 0] == 0)
    x64 = x.detach().double().requires_grad_()
    w64 = gln.weight.detach().double().requires_grad_()
    b64 = gln.bias.detach().double().requires_grad_()
    z64 = z.detach().double().requires_grad_()
    oracle = _oracle_ln(x64, w64, b64, z64, gln.eps)
    # same-dtype torch reference: the same formula evaluated in dtype
    k = z.detach() != 0
    ref = torch.zeros_like(x)
    ref[..., k] = F.layer_norm(x.detach()[..., k], (int(k.sum()),), gln.weight.detach()[k].to(dtype),
                               gln.bias.detach()[k].to(dtype), gln.eps) * z.detach()[k].to(dtype)
    assert_close_to_oracle(out.detach(), oracle.detach(), ref, dtype)
    go = torch.randn_like(oracle) * 3
    out.backward(go.to(dtype))
    oracle.backward(go)
    floor = 1e-4 if dtype == torch.float32 else 5e-2
    for got, want, what in ((x.grad, x64.grad, "dx"), (gln.weight.grad, w64.grad, "dw"),
                            (gln.bias.grad, b64.grad, "db"), (z.grad, z64.grad, "dz")):
        scale = want.abs().max().item()
        assert (got.double() - want).abs().max().item() <= floor * max(scale, 1.0), what


def test_gated_layernorm_all_kept_is_plain_layernorm_and_none_kept_is_zero():
    n = 24
    gln, ln = _gated_ln(n, torch.ones(n))
    x = torch.randn(3, 5, n) * 10
    assert torch.equal(gln(x), ln(x))
    gln0, _ = _gated_ln(n, torch.zeros(n))
    assert torch.equal(gln0(x), torch.zeros_like(x))


# --- the gated model -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", ["kdfast", "sdpa"])
def test_open_hidden_gate_equals_ungated_exactly(impl):
    ids, am = _batch()
    model = _model(impl).eval()
    ref = _run(model, ids, am)
    gates = kc.add_gates(model, heads=impl == "kdfast", ffn=True, hidden=True)
    assert not gates.training  # gates follow the model's mode
    with torch.no_grad():
        for g in [gates.hidden, *gates.head, *gates.ffn]:
            g.log_alpha.fill_(10.0)
    assert torch.all(gates.hidden_values() == 1)
    out = _run(model, ids, am)
    assert torch.equal(out.start_logits, ref.start_logits) and torch.equal(out.end_logits, ref.end_logits)
    kc.remove_gates(model)
    assert type(model.bert.embeddings.LayerNorm) is torch.nn.LayerNorm
    assert torch.equal(_run(model, ids, am).start_logits, ref.start_logits)


def test_hidden_mask_acts_on_the_residual_stream():
    """Pruned dims are exactly 0 in every hidden state, and pruning them changes the outputs."""
    ids, am = _batch()
    model = _model().eval()
    ref = _run(model, ids, am)
    gates = kc.add_gates(model, heads=False, ffn=False, hidden=True)
    with torch.no_grad():
        gates.hidden.log_alpha.copy_(_hidden_log_alpha())
    z = gates.hidden_values()
    assert 0 < int((z == 0).sum()) < D
    out = _run(model, ids, am, output_hidden_states=True)
    assert len(out.hidden_states) == NL + 1
    for h in out.hidden_states:
        assert torch.all(h[..., z == 0] == 0) and h[..., z != 0].abs().amax() > 0.1
    assert (out.start_logits - ref.start_logits).abs().max() > 1e-2


def test_training_samples_one_hidden_mask_per_forward_and_gets_gradients():
    ids, am = _batch()
    model = _model().train()
    gates = kc.add_gates(model, heads=True, ffn=True, hidden=True)
    with torch.no_grad():
        gates.hidden.log_alpha.copy_(_hidden_log_alpha())
    torch.manual_seed(7)
    out = model(input_ids=ids, attention_mask=am, output_hidden_states=True)
    z = gates.hidden_mask.current[0].detach()
    assert 0 < int((z == 0).sum()) < D
    for h in out.hidden_states:
        assert torch.all(h[..., z == 0] == 0)
    loss = out.start_logits.float().pow(2).mean() + gates.expected_sparsity()
    loss.backward()
    assert gates.hidden.log_alpha.grad is not None and gates.hidden.log_alpha.grad.abs().sum() > 0


def test_expected_params_include_hidden_gate():
    model = _model()
    gates = kc.add_gates(model, heads=True, ffn=True, layers=True, hidden=True)
    _set_gates(gates)
    ed = gates.hidden.prob_nonzero().sum()
    want = 0.0
    for i in range(NL):
        eh = gates.head[i].prob_nonzero().sum() * gates.mha_layer[i].prob_nonzero()[0]
        ef = gates.ffn[i].prob_nonzero().sum() * gates.ffn_layer[i].prob_nonzero()[0]
        want = want + 4 * ed * (D // H) * eh + 2 * ed * ef
    torch.testing.assert_close(gates.expected_params(), want)
    s = gates.expected_sparsity()
    s.backward()
    assert gates.hidden.log_alpha.grad.abs().sum() > 0
    rep = gates.report()
    assert rep[0]["hidden"] == D and rep[0]["kept_hidden"] == int((gates.hidden.deterministic() > 0).sum())
    assert abs(rep[0]["expected_hidden"] - ed.item()) < 1e-3
    # without the hidden gate, the hidden factor is d_model
    plain = kc.add_gates(_model(), heads=True, ffn=True)
    assert plain.report()[0]["expected_hidden"] == D


# --- compaction and save / load --------------------------------------------------------------------------------

def _encoder_matrix_params(model):
    n = 0
    for layer in model.bert.encoder.layer:
        sa = layer.attention.self
        if hasattr(sa, "query"):
            n += sa.query.weight.numel() + sa.key.weight.numel() + sa.value.weight.numel()
        n += layer.attention.output.dense.weight.numel()
        n += layer.intermediate.dense.weight.numel() + layer.output.dense.weight.numel()
    return n


@pytest.mark.parametrize("impl", ["kdfast", "sdpa"])
def test_compact_save_load_with_hidden_gate(impl, tmp_path):
    heads = impl == "kdfast"
    model = _model(impl)
    gates = kc.add_gates(model, heads=heads, ffn=True, hidden=True)
    _set_gates(gates)
    model.eval()
    ids, am = _batch()
    gated = _run(model, ids, am)
    z = gates.hidden_values()
    d = int((z != 0).sum())
    assert d < D and bool(((z > 0) & (z < 1)).any())  # some dims pruned, some kept values folded
    kept_params = sum(r["kept_params"] for r in gates.report())
    structure = kc.compact(model)
    assert structure["hidden_size"] == d and structure["full_hidden_size"] == D
    assert structure["kept_hidden"] == torch.nonzero(z != 0).flatten().tolist()
    if heads:
        assert structure["num_heads"][2] == 0 and structure["num_heads"][0] == 3
    assert structure["ffn_dims"][3] == 0
    assert model.config.hidden_size == d
    emb = model.bert.embeddings
    assert emb.word_embeddings.weight.shape == (211, d) and emb.LayerNorm.weight.shape == (d,)
    assert model.qa_outputs.weight.shape == (2, d)
    layer0 = model.bert.encoder.layer[0]
    assert layer0.attention.self.attention_head_size == D // H  # not hidden_size / heads
    assert layer0.attention.self.query.in_features == d and layer0.output.dense.out_features == d
    assert _encoder_matrix_params(model) == kept_params
    compacted = _run(model, ids, am)
    for name in ("start_logits", "end_logits"):
        torch.testing.assert_close(getattr(compacted, name), getattr(gated, name), atol=2e-5, rtol=1e-4)
    n_params = sum(p.numel() for p in model.parameters())
    kc.save_pruned(model, str(tmp_path))
    for load_impl in ("kdfast", "sdpa"):
        loaded = kc.load_pruned(str(tmp_path), attn_implementation=load_impl)
        assert loaded.config.hidden_size == d
        assert loaded.config.kdfast_pruning["full_hidden_size"] == D
        assert loaded.bert.encoder.layer[0].attention.self.attention_head_size == D // H
        assert sum(p.numel() for p in loaded.parameters()) == n_params
        out = _run(loaded, ids, am)
        for name in ("start_logits", "end_logits"):
            torch.testing.assert_close(getattr(out, name), getattr(gated, name), atol=2e-5, rtol=1e-4)


def test_compact_hidden_with_pooler_and_explicit_masks(tmp_path):
    """Sequence classification (pooler input columns); explicit masks; compacting twice composes."""
    ids, am = _batch()
    model = _model("sdpa", cls=AutoModelForSequenceClassification)
    gates = kc.add_gates(model, heads=False, ffn=False, hidden=True)
    with torch.no_grad():
        gates.hidden.log_alpha.copy_(_hidden_log_alpha().sign() * 10)  # gates exactly 0 or 1
    model.eval()
    z = gates.hidden_values()
    gated = _run(model, ids, am).logits
    kc.remove_gates(model)
    first = torch.ones(D)
    first[torch.nonzero(z == 0).flatten()[:5]] = 0
    kc.compact(model, hidden=first)  # prune 5 of the gate's dims first
    second = z[first != 0]
    st = kc.compact(model, hidden=second)  # then the rest
    assert st["hidden_size"] == int((z != 0).sum()) and st["full_hidden_size"] == D
    assert st["kept_hidden"] == torch.nonzero(z != 0).flatten().tolist()
    assert model.bert.pooler.dense.weight.shape == (D, st["hidden_size"])
    torch.testing.assert_close(_run(model, ids, am).logits, gated, atol=2e-5, rtol=1e-4)
    kc.save_pruned(model, str(tmp_path))
    loaded = kc.load_pruned(str(tmp_path), attn_implementation="sdpa")
    torch.testing.assert_close(_run(loaded, ids, am).logits, gated, atol=2e-5, rtol=1e-4)


def test_compact_hidden_token_classification_head():
    ids, am = _batch()
    model = _model("sdpa", cls=AutoModelForTokenClassification)
    gates = kc.add_gates(model, heads=False, ffn=True, hidden=True)
    _set_gates(gates)
    model.eval()
    gated = _run(model, ids, am).logits
    st = kc.compact(model)
    assert model.classifier.in_features == st["hidden_size"] < D
    torch.testing.assert_close(_run(model, ids, am).logits, gated, atol=2e-5, rtol=1e-4)


def test_hidden_errors():
    model = _model().eval()
    with pytest.raises(ValueError, match="hidden must have 96 entries"):
        kc.compact(model, hidden=torch.ones(5))
    with pytest.raises(ValueError, match="every hidden dim is pruned"):
        kc.compact(_model().eval(), hidden=torch.zeros(D))
    with pytest.raises(ValueError, match="does not know the head"):
        kc.compact(_model("sdpa", cls=AutoModelForMaskedLM).eval(), hidden=torch.ones(D))
    with pytest.raises(ValueError, match="at least one"):
        kc.add_gates(_model(), heads=False, ffn=False, layers=False, hidden=False)
