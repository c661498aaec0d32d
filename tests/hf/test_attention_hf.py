"""The "kdfast" attention implementation in transformers: equal to sdpa with
padding, mask function registered, observers, gates from the module."""
import pytest
import torch

import kdfast.hf
from kdfast.hf import attention as hfa

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForQuestionAnswering, BertConfig  # noqa: E402


def _config():
    return BertConfig(vocab_size=211, hidden_size=96, num_hidden_layers=3, num_attention_heads=6,
                      intermediate_size=160, max_position_embeddings=128)


def _batch(B=4, L=41, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 211, (B, L), generator=g)
    am = torch.ones(B, L, dtype=torch.long)
    for b, n in enumerate([L, 30, 7, 1][:B]):
        am[b, n:] = 0
    return ids, am


def _model(impl):
    torch.manual_seed(0)
    return AutoModelForQuestionAnswering.from_config(_config(), attn_implementation=impl).eval()


def test_register_is_idempotent_and_registers_mask():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
    kdfast.hf.register()
    kdfast.hf.register()
    assert "kdfast" in AttentionInterface._global_mapping
    assert "kdfast" in AttentionMaskInterface._global_mapping


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_equals_sdpa_on_padded_batch(backend):
    ids, am = _batch()
    ref, fast = _model("sdpa"), _model("kdfast")
    assert fast.config._attn_implementation == "kdfast"
    with torch.no_grad():
        a = ref(input_ids=ids, attention_mask=am)
        with kdfast.use_backend(None if backend == "auto" else backend):
            b = fast(input_ids=ids, attention_mask=am)
    # every position, padded ones included, matches sdpa
    torch.testing.assert_close(b.start_logits, a.start_logits, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(b.end_logits, a.end_logits, atol=2e-5, rtol=1e-4)


def test_padding_mask_reaches_attention():
    # Without the mask function transformers would drop the mask: padded tokens would change valid outputs.
    ids, am = _batch()
    fast = _model("kdfast")
    ids2 = ids.clone()
    ids2[am == 0] = (ids2[am == 0] + 5) % 211
    with torch.no_grad():
        a = fast(input_ids=ids, attention_mask=am).start_logits
        b = fast(input_ids=ids2, attention_mask=am).start_logits
    keep = am.bool()
    torch.testing.assert_close(a[keep], b[keep], atol=1e-5, rtol=1e-5)


def test_no_mask_equals_sdpa():
    ids, _ = _batch()
    with torch.no_grad():
        a = _model("sdpa")(input_ids=ids).start_logits
        b = _model("kdfast")(input_ids=ids).start_logits
    torch.testing.assert_close(b, a, atol=2e-5, rtol=1e-4)


def test_zero_padded_queries_keeps_valid_positions():
    ids, am = _batch()
    fast, ref = _model("kdfast"), _model("sdpa")
    prev = kdfast.hf.set_options(zero_padded_queries=True)
    try:
        with torch.no_grad():
            b = fast(input_ids=ids, attention_mask=am).start_logits
    finally:
        kdfast.hf.set_options(**prev)
    with torch.no_grad():
        a = ref(input_ids=ids, attention_mask=am).start_logits
    keep = am.bool()
    torch.testing.assert_close(b[keep], a[keep], atol=2e-5, rtol=1e-4)


def test_observer_sees_qkv_and_mask_and_is_removable():
    ids, am = _batch()
    fast = _model("kdfast")
    seen = []

    def obs(module, q, k, v, mask):
        seen.append((module.layer_idx, q.shape, k.shape, v.shape, mask))

    h = kdfast.hf.add_observer(obs)
    with torch.no_grad():
        fast(input_ids=ids, attention_mask=am)
    h.remove()
    h.remove()  # idempotent
    assert [s[0] for s in seen] == [0, 1, 2]
    assert all(s[1] == (4, 6, 41, 16) for s in seen)
    assert torch.equal(seen[0][4], am.bool())
    n = len(seen)
    with torch.no_grad():
        fast(input_ids=ids, attention_mask=am)
    assert len(seen) == n and hfa._observers == []


def test_observer_query_equals_projection():
    ids, am = _batch()
    fast = _model("kdfast")
    got = {}
    with kdfast.hf.add_observer(lambda m, q, k, v, mask: got.setdefault(m.layer_idx, q)):
        with torch.no_grad():
            out = fast(input_ids=ids, attention_mask=am, output_hidden_states=True)
    h0 = out.hidden_states[0]
    sa = fast.bert.encoder.layer[0].attention.self
    q = sa.query(h0).view(4, 41, 6, 16).transpose(1, 2)
    torch.testing.assert_close(got[0], q)


def test_module_gates_and_active_heads_applied():
    ids, am = _batch()
    ref, fast = _model("sdpa"), _model("kdfast")
    sa = fast.bert.encoder.layer[1].attention.self
    sa.kdfast_active_heads = torch.tensor([True, False, True, True, False, True])
    sa.kdfast_head_gates = lambda: torch.tensor([0.5, 1.0, 2.0, 1.0, 1.0, 0.0])
    # the same thing done by hand on the sdpa model: zero the dense input columns of pruned heads and scale gated ones
    scale = torch.tensor([0.5, 0.0, 2.0, 1.0, 0.0, 0.0]).repeat_interleave(16)
    dense = ref.bert.encoder.layer[1].attention.output.dense
    with torch.no_grad():
        dense.weight.mul_(scale[None, :])
        a = ref(input_ids=ids, attention_mask=am).start_logits
        b = fast(input_ids=ids, attention_mask=am).start_logits
    torch.testing.assert_close(b, a, atol=2e-5, rtol=1e-4)


@pytest.mark.cpu
def test_train_mode_dropout_runs_the_kdfast_kernel_not_sdpa(monkeypatch):
    # BERT's default attention dropout (0.1) in train mode: the kdfast CPU kernel draws the mask
    # (no SDPA call anywhere); torch.manual_seed reproduces loss and gradients.
    import importlib
    opa = importlib.import_module("kdfast.ops.attention")
    fast = _model("kdfast").train()
    assert fast.config.attention_probs_dropout_prob > 0

    def no_sdpa(*a, **k):
        raise AssertionError("SDPA called")
    monkeypatch.setattr(hfa.F, "scaled_dot_product_attention", no_sdpa)
    monkeypatch.setattr(opa.F, "scaled_dot_product_attention", no_sdpa)
    calls = []
    orig = torch.ops.kdfast_C.attention_train_fwd

    class Spy:
        def __call__(self, *a):
            calls.append(a[13])  # dropout_p
            return orig(*a)
    monkeypatch.setattr(opa.torch.ops.kdfast_C, "attention_train_fwd", Spy(), raising=False)
    ids, am = _batch()
    res = []
    for _ in range(2):
        torch.manual_seed(3)
        out = fast(input_ids=ids, attention_mask=am)
        loss = out.start_logits.square().mean()
        grads = torch.autograd.grad(loss, [fast.bert.encoder.layer[0].attention.self.query.weight])
        res.append((loss.detach(), grads[0]))
    assert calls and all(p == pytest.approx(0.1) for p in calls)
    assert torch.equal(res[0][0], res[1][0]) and torch.equal(res[0][1], res[1][1])
