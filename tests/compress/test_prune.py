"""add_gates -> compact -> save_pruned -> load_pruned on a small random BERT QA model."""
import pytest
import torch

import kdfast.hf  # noqa: F401  (registers the kdfast attention)
import kdfast.compress as kc
from transformers import AutoModelForQuestionAnswering, BertConfig


def _model(impl="kdfast", seed=0):
    cfg = BertConfig(vocab_size=211, hidden_size=96, num_hidden_layers=4, num_attention_heads=6,
                     intermediate_size=160, max_position_embeddings=128)
    torch.manual_seed(seed)
    return AutoModelForQuestionAnswering.from_config(cfg, attn_implementation=impl)


def _batch():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 211, (3, 45), generator=g)
    am = torch.ones(3, 45, dtype=torch.long)
    am[1, 30:] = 0
    am[2, 9:] = 0
    return ids, am


def _set_gates(gates):
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for i, hg in enumerate(gates.head):
            hg.log_alpha.copy_(torch.randn(6, generator=g) * 3)
        gates.head[0].log_alpha.copy_(torch.tensor([5.0, -9, 5, -9, -9, 0.3]))  # uneven: 3 kept, one partial
        gates.head[2].log_alpha.fill_(-10.0)  # fully pruned attention
        for fg in gates.ffn:
            fg.log_alpha.copy_(torch.randn(160, generator=g) * 3)
        gates.ffn[3].log_alpha.fill_(-10.0)  # fully pruned FFN


def test_gates_train_and_report():
    model = _model()
    gates = kc.add_gates(model, heads=True, ffn=True, layers=True)
    ids, am = _batch()
    model.train()
    out = model(input_ids=ids, attention_mask=am)
    loss = out.start_logits.float().pow(2).mean() + gates.expected_sparsity()
    loss.backward()
    for group in (gates.head, gates.ffn, gates.mha_layer, gates.ffn_layer):
        assert all(g.log_alpha.grad is not None and g.log_alpha.grad.abs().sum() > 0 for g in group)
    assert 0 < gates.expected_sparsity().item() < 1
    rep = gates.report()
    assert len(rep) == 4 and rep[0]["heads"] == 6 and rep[0]["ffn"] == 160
    assert any(p is model.kdfast_gates.head[0].log_alpha for p in model.parameters())


def _pin(gates, heads_kept, ffn_kept):
    """Gates with prob_nonzero ~1 for the first heads_kept heads / ffn_kept FFN units, ~0 elsewhere."""
    with torch.no_grad():
        for hg in gates.head:
            hg.log_alpha.fill_(-30.0)
            hg.log_alpha[:heads_kept] = 30.0
        for fg in gates.ffn:
            fg.log_alpha.fill_(-30.0)
            fg.log_alpha[:ffn_kept] = 30.0


def test_flops_cost_matches_hand_count_and_charges_attention():
    d, H, dh, F, L, layers = 96, 6, 16, 160, 40.0, 4
    model = _model()
    gates = kc.add_gates(model, cost="flops", seq_len=L)
    assert gates.full_flops() == layers * (H * (4 * d * dh + 2 * L * dh) + 2 * d * F)
    _pin(gates, 2, 40)
    kept = layers * (2 * (4 * d * dh + 2 * L * dh) + 2 * d * 40)
    assert gates.expected_flops().item() == pytest.approx(kept, rel=1e-6)
    assert gates.expected_sparsity().item() == pytest.approx(1 - kept / gates.full_flops(), rel=1e-6)
    # the same gates counted as weights: pruning heads removes a smaller share of weights than of
    # multiply-adds, because a head's attention work has no weights
    by_params = kc.add_gates(_model(), cost="params")
    _pin(by_params, 2, 40)
    assert by_params.expected_sparsity().item() == pytest.approx(
        1 - (4 * d * dh * 2 + 2 * d * 40) / (4 * d * dh * H + 2 * d * F), rel=1e-6)
    _pin(gates, 2, F)
    _pin(by_params, 2, F)
    assert gates.expected_sparsity().item() > by_params.expected_sparsity().item()
    loss = gates.expected_sparsity()
    loss.backward()  # differentiable in the gates
    assert gates.head[0].log_alpha.grad is not None


@pytest.mark.parametrize("kw, msg", [(dict(cost="latency"), "cost must be"), (dict(cost="flops"), "seq_len")])
def test_add_gates_cost_errors(kw, msg):
    with pytest.raises(ValueError, match=msg):
        kc.add_gates(_model(), **kw)


def test_add_gates_switches_to_kdfast_attention():
    import kdfast.compress.prune as prune
    prune._SWITCH_WARNED = False
    model = _model("sdpa").eval()
    ids, am = _batch()
    with pytest.warns(UserWarning, match="switched the model"):
        gates = kc.add_gates(model)
    assert model.config._attn_implementation == "kdfast"
    with torch.no_grad():  # head gates now act: closing every head changes the output
        before = model(input_ids=ids, attention_mask=am).start_logits
        for g in gates.head:
            g.log_alpha.fill_(-20.0)
        after = model(input_ids=ids, attention_mask=am).start_logits
    assert not torch.allclose(before, after)
    ffn_only = _model("sdpa")
    kc.add_gates(ffn_only, heads=False, ffn=True)  # FFN-only gates work with any attention
    assert ffn_only.config._attn_implementation == "sdpa"


def test_remove_gates_restores_model():
    model = _model().eval()
    ids, am = _batch()
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=am).start_logits
        gates = kc.add_gates(model)
        _set_gates(gates)
        b = model(input_ids=ids, attention_mask=am).start_logits
        kc.remove_gates(model)
        c = model(input_ids=ids, attention_mask=am).start_logits
    assert not torch.allclose(a, b)
    torch.testing.assert_close(a, c)


def test_compact_save_load_round_trip(tmp_path):
    model = _model()
    gates = kc.add_gates(model)
    _set_gates(gates)
    model.eval()
    ids, am = _batch()
    with torch.no_grad():
        gated = model(input_ids=ids, attention_mask=am)
    structure = kc.compact(model)
    assert structure["num_heads"][0] == 3 and structure["num_heads"][2] == 0
    assert structure["ffn_dims"][3] == 0
    assert len(set(structure["num_heads"])) > 1  # uneven heads per layer
    assert not hasattr(model, "kdfast_gates")
    n_params = sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        compacted = model(input_ids=ids, attention_mask=am)
    for name in ("start_logits", "end_logits"):
        torch.testing.assert_close(getattr(compacted, name), getattr(gated, name), atol=2e-5, rtol=1e-4)
    kc.save_pruned(model, str(tmp_path))
    for impl in ("kdfast", "sdpa"):
        loaded = kc.load_pruned(str(tmp_path), attn_implementation=impl)
        assert loaded.config.kdfast_pruning["num_heads"] == structure["num_heads"]
        assert sum(p.numel() for p in loaded.parameters()) == n_params
        with torch.no_grad():
            out = loaded(input_ids=ids, attention_mask=am)
        torch.testing.assert_close(out.start_logits, gated.start_logits, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(out.end_logits, gated.end_logits, atol=2e-5, rtol=1e-4)


def test_compact_with_explicit_masks_matches_masked_dense():
    model = _model().eval()
    ids, am = _batch()
    heads = [torch.tensor([1, 0, 1, 0, 1, 0]), torch.ones(6), torch.zeros(6), torch.tensor([0, 0, 0, 0, 0, 1])]
    ffn = [torch.rand(160, generator=torch.Generator().manual_seed(i)) > 0.6 for i in range(4)]
    ref = _model().eval()
    with torch.no_grad():
        for i, layer in enumerate(ref.bert.encoder.layer):  # the same pruning by zeroing input columns
            layer.attention.output.dense.weight.mul_(heads[i].float().repeat_interleave(16)[None])
            layer.output.dense.weight.mul_(ffn[i].float()[None])
        a = ref(input_ids=ids, attention_mask=am).start_logits
        kc.compact(model, heads=heads, ffn=ffn)
        b = model(input_ids=ids, attention_mask=am).start_logits
    torch.testing.assert_close(b, a, atol=2e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="one entry per layer"):
        kc.compact(model, heads=heads[:2])


def test_save_pruned_refuses_gated_model(tmp_path):
    model = _model()
    kc.add_gates(model)
    with pytest.raises(ValueError, match="compact"):
        kc.save_pruned(model, str(tmp_path))
