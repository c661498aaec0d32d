import pytest
import torch

from kdfast.nn import LayerKD, layer_mapping
from kdfast.ops import (attention_kl_reference, attention_score_mse_reference, hidden_cosine_reference,
                        hidden_mse_reference)


def test_mappings():
    assert layer_mapping(4, 12) == [(1, 3), (2, 6), (3, 9), (4, 12)]
    assert layer_mapping(3, 4) == [(1, 1), (2, 2), (3, 4)]
    assert layer_mapping(4, 12, "last_k", k=2) == [(3, 11), (4, 12)]
    assert layer_mapping(4, 12, "last_k") == [(1, 9), (2, 10), (3, 11), (4, 12)]
    assert layer_mapping(3, 12, "skip", stride=2) == [(1, 2), (2, 4), (3, 6)]
    assert layer_mapping(3, 12, "skip") == [(1, 4), (2, 8), (3, 12)]
    assert layer_mapping(3, 12, [2, None, 12]) == [(1, 2), (3, 12)]
    assert layer_mapping(3, 12, [(3, 12), (1, 1)]) == [(3, 12), (1, 1)]


def test_mapping_errors():
    with pytest.raises(ValueError, match="mapping must be one of"):
        layer_mapping(2, 4, "middle")
    with pytest.raises(ValueError, match="one teacher layer per student layer"):
        layer_mapping(2, 4, [1])
    with pytest.raises(ValueError, match="out of range"):
        layer_mapping(2, 4, [1, 5])
    with pytest.raises(ValueError, match="k must be in"):
        layer_mapping(2, 4, "last_k", k=3)


def _cfg(layers, hidden):
    return {"num_hidden_layers": layers, "hidden_size": hidden}


def _fake_model(layers, hidden, heads, head_dim, B, L, seed):
    g = torch.Generator().manual_seed(seed)
    hs = [torch.randn(B, L, hidden, generator=g) * 3 for _ in range(layers + 1)]
    qkv = [tuple(torch.randn(B, heads, L, head_dim, generator=g) * 2 for _ in range(3)) for _ in range(layers)]
    return hs, qkv


def test_totals_match_reference_terms_and_projections_learn():
    B, L, H = 2, 11, 2
    s_hs, s_qkv = _fake_model(2, 16, H, 8, B, L, 0)
    t_hs, t_qkv = _fake_model(4, 24, H, 12, B, L, 1)
    for x in s_hs + [t for layer in s_qkv for t in layer]:
        x.requires_grad_()
    mask = torch.ones(B, L)
    mask[1, 6:] = 0
    weights = {"embedding": 0.5, "hidden": 1.0, "hidden_cosine": 0.3, "attention_score": 0.01,
               "attention_kl": 2.0, "value_relation": 1.5}
    kd = LayerKD(_cfg(2, 16), _cfg(4, 24), mapping="uniform", losses=weights)
    assert kd.pairs == [(1, 2), (2, 4)]
    total, terms = kd(s_hs, s_qkv, t_hs, t_qkv, mask)
    assert set(terms) == set(weights)
    W, b = kd.hidden_proj[0].weight, kd.hidden_proj[0].bias
    We, be = kd.embedding_proj.weight, kd.embedding_proj.bias
    d = torch.float64

    def dd(x):
        return x.detach().to(d)

    exp = {
        "embedding": hidden_mse_reference(dd(s_hs[0]), dd(t_hs[0]), dd(We), dd(be), mask),
        "hidden": sum(hidden_mse_reference(dd(s_hs[s]), dd(t_hs[t]), dd(W), dd(b), mask) for s, t in kd.pairs),
        "hidden_cosine": sum(hidden_cosine_reference(dd(s_hs[s]), dd(t_hs[t]), dd(W), dd(b), mask)
                             for s, t in kd.pairs),
        "attention_score": sum(attention_score_mse_reference(dd(s_qkv[s - 1][0]), dd(s_qkv[s - 1][1]),
                                                             dd(t_qkv[t - 1][0]), dd(t_qkv[t - 1][1]), mask)
                               for s, t in kd.pairs),
        "attention_kl": sum(attention_kl_reference(dd(s_qkv[s - 1][0]), dd(s_qkv[s - 1][1]), dd(t_qkv[t - 1][0]),
                                                   dd(t_qkv[t - 1][1]), mask) for s, t in kd.pairs),
        "value_relation": sum(attention_kl_reference(dd(s_qkv[s - 1][2]), dd(s_qkv[s - 1][2]), dd(t_qkv[t - 1][2]),
                                                     dd(t_qkv[t - 1][2]), mask) for s, t in kd.pairs),
    }
    for name, v in exp.items():
        assert abs(terms[name].item() - v.item()) <= 1e-4 * max(1.0, abs(v.item())), name
    want = sum(weights[n] * exp[n] for n in exp)
    assert abs(total.item() - want.item()) <= 1e-4 * want.item()
    total.backward()
    for p in (W, b, We, be, s_hs[0], s_hs[4 // 2], s_qkv[0][0], s_qkv[1][2]):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    assert t_hs[2].grad is None


def test_equal_sizes_have_no_projection_and_default_terms():
    kd = LayerKD(_cfg(2, 8), _cfg(2, 8))
    assert kd.hidden_proj is None and kd.embedding_proj is None
    assert set(kd.losses) == {"embedding", "hidden", "attention_score"}
    kd = LayerKD(_cfg(2, 8), _cfg(4, 12), losses={"attention_kl": 1.0})
    assert kd.hidden_proj is None and kd.embedding_proj is None  # no hidden term: nothing to project
    per = LayerKD(_cfg(2, 8), _cfg(4, 12), losses={"hidden": 1.0}, projection="per_layer")
    assert len(per.hidden_proj) == 2


def test_errors():
    with pytest.raises(ValueError, match="unknown loss term"):
        LayerKD(_cfg(2, 8), _cfg(2, 8), losses={"attention": 1.0})
    with pytest.raises(ValueError, match="must be a number >= 0"):
        LayerKD(_cfg(2, 8), _cfg(2, 8), losses={"hidden": -1.0})
    with pytest.raises(ValueError, match="has no attribute 'num_hidden_layers'"):
        LayerKD(object(), _cfg(2, 8))
    kd = LayerKD(_cfg(2, 8), _cfg(2, 8), losses={"attention_kl": 1.0})
    with pytest.raises(ValueError, match="needs student_qkv"):
        kd(mask=None)
    kd = LayerKD(_cfg(2, 8), _cfg(4, 8), losses={"hidden": 1.0})
    hs = [torch.randn(1, 3, 8)] * 3
    with pytest.raises(ValueError, match="teacher_hidden_states has 3 entries"):
        kd(hs, teacher_hidden_states=hs)



def test_mask_dtypes_and_the_old_argument_order():
    B, L, H = 2, 9, 2
    s_hs, s_qkv = _fake_model(2, 16, H, 8, B, L, 2)
    t_hs, t_qkv = _fake_model(4, 24, H, 12, B, L, 3)
    keep = torch.ones(B, L, dtype=torch.bool)
    keep[0, 5:] = False
    kd = LayerKD(_cfg(2, 16), _cfg(4, 24), losses={"hidden": 1.0, "attention_kl": 1.0, "value_relation": 1.0})
    want, want_terms = kd(s_hs, s_qkv, t_hs, t_qkv, keep)
    for m in (keep.long(), keep.int(), keep.float()):
        torch.testing.assert_close(kd(s_hs, s_qkv, t_hs, t_qkv, mask=m)[0], want, rtol=0, atol=0)
    # One release: the old order (hidden states of both, then q/k/v of both) and attention_mask=.
    with pytest.warns(DeprecationWarning, match="positional order"):
        old, old_terms = kd(s_hs, t_hs, s_qkv, t_qkv, keep)
    with pytest.warns(DeprecationWarning, match="attention_mask= is renamed mask="):
        old_kw, _ = kd(s_hs, s_qkv, t_hs, t_qkv, attention_mask=keep)
    for got in (old, old_kw):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert old_terms.keys() == want_terms.keys()


# --- mappings of issue 15: hand-made depths ------------------------------------------------------
from kdfast.nn.layer_mapping import LayerMapping, mean_blocks, random_monotone  # noqa: E402

DEPTHS = [(2, 6), (3, 12), (4, 12), (1, 1)]
EXPECTED = {
    "uniform": {(2, 6): [(1, 3), (2, 6)], (3, 12): [(1, 4), (2, 8), (3, 12)],
                (4, 12): [(1, 3), (2, 6), (3, 9), (4, 12)], (1, 1): [(1, 1)]},
    "skip": {(2, 6): [(1, 3), (2, 6)], (3, 12): [(1, 4), (2, 8), (3, 12)],
             (4, 12): [(1, 3), (2, 6), (3, 9), (4, 12)], (1, 1): [(1, 1)]},
    "first_k": {(2, 6): [(1, 1), (2, 2)], (3, 12): [(1, 1), (2, 2), (3, 3)],
                (4, 12): [(1, 1), (2, 2), (3, 3), (4, 4)], (1, 1): [(1, 1)]},
    "last_k": {(2, 6): [(1, 5), (2, 6)], (3, 12): [(1, 10), (2, 11), (3, 12)],
               (4, 12): [(1, 9), (2, 10), (3, 11), (4, 12)], (1, 1): [(1, 1)]},
}
BLOCKS = {(2, 6): [[1, 2, 3], [4, 5, 6]], (3, 12): [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]],
          (4, 12): [[1, 2, 3], [4, 5, 6], [7, 8, 9], [10, 11, 12]], (1, 1): [[1]]}


@pytest.mark.parametrize("depth", DEPTHS)
def test_hand_made_depths(depth):
    M, N = depth
    for name, table in EXPECTED.items():
        assert layer_mapping(M, N, name) == table[depth], name
        assert [g[:2] for g in LayerMapping(M, N, name).groups()] == [(s, [t]) for s, t in table[depth]]
    assert layer_mapping(M, N, "first_k", k=1) == [(1, 1)]
    assert mean_blocks(M, N) == BLOCKS[depth]
    groups = LayerMapping(M, N, "mean").groups()
    assert [(s, ts) for s, ts, _ in groups] == list(enumerate(BLOCKS[depth], 1))
    assert all(abs(sum(w) - 1) < 1e-12 for _, _, w in groups)
    learned = LayerMapping(M, N, "learned").groups()
    assert [(s, ts) for s, ts, _ in learned] == [(m, list(range(1, N + 1))) for m in range(1, M + 1)]
    for seed in range(3):
        for epoch in range(3):
            pick = random_monotone(M, N, seed, epoch)
            assert pick == sorted(set(pick)) and len(pick) == M and 1 <= pick[0] and pick[-1] <= N
            assert pick == random_monotone(M, N, seed, epoch)  # reproducible


def test_random_mapping_resamples_per_epoch():
    m = LayerMapping(3, 12, "random", seed=7)
    seen = set()
    for epoch in range(6):
        m.resample(epoch)
        assert m.pairs == list(zip([1, 2, 3], random_monotone(3, 12, 7, epoch)))
        seen.add(tuple(m.pairs))
    assert len(seen) > 1
    kd = LayerKD(_cfg(3, 8), _cfg(12, 8), mapping="uniform", attention_mapping="random", seed=7,
                 losses={"attention_kl": 1.0, "hidden": 1.0})
    kd.resample(4)
    assert kd.attention_map.pairs == list(zip([1, 2, 3], random_monotone(3, 12, 7, 4)))
    assert kd.pairs == [(1, 4), (2, 8), (3, 12)]  # hidden terms keep their own mapping
    assert kd.capture_args("teacher")["layers"] == [t - 1 for t in random_monotone(3, 12, 7, 4)]
    assert LayerMapping(2, 6, "random").pairs != [] and LayerMapping(1, 1, "random").pairs == [(1, 1)]


def _masked_mse(a, b, mask):
    keep = mask.bool()
    return ((a - b) ** 2)[keep].sum() / (keep.sum() * a.shape[-1])


def test_mean_mapping_equals_hand_computed_average():
    B, L, H = 2, 7, 2
    s_hs, s_qkv = _fake_model(2, 8, H, 4, B, L, 3)
    t_hs, t_qkv = _fake_model(6, 8, H, 4, B, L, 4)
    mask = torch.ones(B, L)
    mask[0, 5:] = 0
    kd = LayerKD(_cfg(2, 8), _cfg(6, 8), mapping="mean", losses={"hidden": 1.0, "attention_score": 1.0})
    _, terms = kd(s_hs, s_qkv, t_hs, t_qkv, mask)
    d = torch.float64
    want_h = (_masked_mse(s_hs[1].to(d), (t_hs[1] + t_hs[2] + t_hs[3]).to(d) / 3, mask)
              + _masked_mse(s_hs[2].to(d), (t_hs[4] + t_hs[5] + t_hs[6]).to(d) / 3, mask))
    assert abs(terms["hidden"].item() - want_h.item()) <= 1e-5 * want_h.item()

    def att(s, t):
        return attention_score_mse_reference(*(x.to(d) for x in (s_qkv[s - 1][0], s_qkv[s - 1][1],
                                                                   t_qkv[t - 1][0], t_qkv[t - 1][1])), mask)
    want_a = sum(att(1, t) for t in (1, 2, 3)) / 3 + sum(att(2, t) for t in (4, 5, 6)) / 3
    assert abs(terms["attention_score"].item() - want_a.item()) <= 1e-5 * want_a.item()


def test_learned_mapping_gradient_reaches_its_weights():
    B, L, H = 2, 6, 2
    s_hs, s_qkv = _fake_model(2, 8, H, 4, B, L, 5)
    t_hs, t_qkv = _fake_model(4, 12, H, 4, B, L, 6)
    for x in s_hs:
        x.requires_grad_()
    kd = LayerKD(_cfg(2, 8), _cfg(4, 12), mapping="learned", losses={"hidden": 1.0, "attention_kl": 1.0})
    assert {n for n, _ in kd.named_parameters()} >= {"hidden_map.logits", "attention_map.logits"}
    w = kd.learned_mapping_weights()
    assert set(w) == {"hidden", "attention"} and w["hidden"].shape == (2, 4)
    assert torch.allclose(w["hidden"].sum(-1), torch.ones(2))
    total, terms = kd(s_hs, s_qkv, t_hs, t_qkv)
    # zero logits: the uniform mix of all teacher layers
    W, b = kd.hidden_proj[0].weight, kd.hidden_proj[0].bias
    mix = sum(t_hs[1:]) / 4
    want = sum(hidden_mse_reference(s_hs[m].detach(), mix, W.detach(), b.detach()) for m in (1, 2))
    assert abs(terms["hidden"].item() - want.item()) <= 1e-4 * want.item()
    total.backward()
    for p in (kd.hidden_map.logits, kd.attention_map.logits):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    assert LayerKD(_cfg(2, 8), _cfg(4, 8), mapping="uniform").learned_mapping_weights() == {}


def test_separate_mappings_and_state_dict_unchanged_for_hard_mappings():
    kd = LayerKD(_cfg(2, 8), _cfg(6, 8), mapping="uniform", attention_mapping="last_k", hidden_mapping="first_k",
                 losses={"hidden": 1.0, "attention_score": 1.0})
    assert kd.hidden_map.pairs == [(1, 1), (2, 2)] and kd.attention_map.pairs == [(1, 5), (2, 6)]
    assert kd.capture_args("teacher") == {"layers": [4, 5], "keep": "qk"}
    assert list(LayerKD(_cfg(2, 8), _cfg(6, 16), losses={"hidden": 1.0}).state_dict()) == \
        ["hidden_proj.0.weight", "hidden_proj.0.bias"]
    with pytest.raises(ValueError, match="mapping must be one of"):
        LayerKD(_cfg(2, 8), _cfg(6, 8), attention_mapping="middle")


def test_attention_terms_skip_a_layer_without_heads():
    """A pruned layer whose heads were all removed gives no q/k/v (capture lists stop before it): with that
    layer left out of the attention mapping (None) the terms use the other layers, and the hidden terms
    still cover every layer; a mapping that needs the missing layer names the entry."""
    B, L = 2, 7
    s_hs, s_qkv = _fake_model(2, 8, 2, 4, B, L, 0)
    t_hs, t_qkv = _fake_model(2, 8, 2, 4, B, L, 1)
    mask = torch.ones(B, L)
    kd = LayerKD(_cfg(2, 8), _cfg(2, 8), mapping=[1, 2], attention_mapping=[1, None],
                 losses={"hidden": 1.0, "attention_score": 1.0})
    total, terms = kd(s_hs, s_qkv[:1], t_hs, t_qkv[:1], mask)
    d = torch.float64
    want = attention_score_mse_reference(s_qkv[0][0].to(d), s_qkv[0][1].to(d), t_qkv[0][0].to(d),
                                         t_qkv[0][1].to(d), mask)
    assert abs(terms["attention_score"].item() - want.item()) <= 1e-4 * max(1.0, want.item())
    want_h = sum(hidden_mse_reference(s_hs[m].to(d), t_hs[m].to(d), None, None, mask) for m in (1, 2))
    assert abs(terms["hidden"].item() - want_h.item()) <= 1e-4 * max(1.0, want_h.item())
    full = LayerKD(_cfg(2, 8), _cfg(2, 8), mapping=[1, 2], losses={"attention_score": 1.0})
    with pytest.raises(ValueError, match=r"student_qkv has 1 entries, the configuration needs entry 1"):
        full(s_hs, s_qkv[:1], t_hs, t_qkv[:1], mask)
