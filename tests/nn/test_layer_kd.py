import pytest
import torch

from kdfast.nn import LayerKD, layer_mapping
from kdfast.ops import attention_kl_reference, attention_score_mse_reference, hidden_loss_reference


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
    total, terms = kd(s_hs, t_hs, s_qkv, t_qkv, attention_mask=mask)
    assert set(terms) == set(weights)
    W, b = kd.hidden_proj[0].weight, kd.hidden_proj[0].bias
    We, be = kd.embedding_proj.weight, kd.embedding_proj.bias
    d = torch.float64

    def dd(x):
        return x.detach().to(d)

    exp = {
        "embedding": hidden_loss_reference(dd(s_hs[0]), dd(t_hs[0]), dd(We), dd(be), mask),
        "hidden": sum(hidden_loss_reference(dd(s_hs[s]), dd(t_hs[t]), dd(W), dd(b), mask) for s, t in kd.pairs),
        "hidden_cosine": sum(hidden_loss_reference(dd(s_hs[s]), dd(t_hs[t]), dd(W), dd(b), mask, kind="cosine")
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
        kd(attention_mask=None)
    kd = LayerKD(_cfg(2, 8), _cfg(4, 8), losses={"hidden": 1.0})
    hs = [torch.randn(1, 3, 8)] * 3
    with pytest.raises(ValueError, match="teacher_hidden_states has 3 entries"):
        kd(hs, hs)
