"""kdfast.hf.unpad_encoder: BERT layers on valid tokens only, equal to the dense model at valid
positions (outputs and gradients), with gates, compacted models and capture."""
import pytest
import torch

import kdfast.compress as kc
import kdfast.hf
from kdfast.hf import unpad as hfu

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForQuestionAnswering, BertConfig, BertModel  # noqa: E402

H, DH, L = 6, 16, 41


def _config(**kw):
    c = dict(vocab_size=211, hidden_size=H * DH, num_hidden_layers=3, num_attention_heads=H, intermediate_size=160,
             max_position_embeddings=128)
    c.update(kw)
    return BertConfig(**c)


def _model(impl, seed=0, **kw):
    torch.manual_seed(seed)
    return AutoModelForQuestionAnswering.from_config(_config(**kw), attn_implementation=impl).eval()


def _batch(B=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 211, (B, L), generator=g)
    am = torch.ones(B, L, dtype=torch.long)
    for b, n in enumerate([L, 30, 7, 1][:B]):
        am[b, n:] = 0
    return ids, am


def _close(a, b, atol=3e-5, rtol=1e-4):
    torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


def test_equals_dense_sdpa_at_valid_positions_and_padded_are_zero():
    ids, am = _batch()
    ref, fast = _model("sdpa"), _model("kdfast")
    kdfast.hf.unpad_encoder(fast)
    assert kdfast.hf.is_unpadded(fast)
    keep = am.bool()
    with torch.no_grad():
        a = ref(input_ids=ids, attention_mask=am)
        b = fast(input_ids=ids, attention_mask=am)
        hb = fast.bert(input_ids=ids, attention_mask=am)
        ha = ref.bert(input_ids=ids, attention_mask=am)
    for name in ("start_logits", "end_logits"):
        _close(getattr(b, name)[keep], getattr(a, name)[keep])
    # padded positions: encoder output 0, so the QA head gives its bias there
    assert torch.equal(hb.last_hidden_state[~keep], torch.zeros_like(hb.last_hidden_state[~keep]))
    _close(b.start_logits[~keep], fast.qa_outputs.bias[0].expand(int((~keep).sum())))
    _close(hb.last_hidden_state[keep], ha.last_hidden_state[keep])
    _close(hb.pooler_output, ha.pooler_output)  # token 0 is valid in every row


def test_padded_inputs_do_not_matter_and_kernel_never_sees_padded_work():
    ids, am = _batch()
    fast = _model("kdfast")
    kdfast.hf.unpad_encoder(fast)
    ids2 = ids.clone()
    ids2[am == 0] = (ids2[am == 0] + 7) % 211
    seen = []
    with kdfast.hf.add_observer(lambda m, q, k, v, mask: seen.append((q, k, v, mask))):
        with torch.no_grad():
            a = fast(input_ids=ids, attention_mask=am).start_logits
            b = fast(input_ids=ids2, attention_mask=am).start_logits
    assert torch.equal(a, b)
    q, k, v, mask = seen[0]
    assert torch.equal(mask, am.bool())
    for t in (q, k, v):  # zero-filled at padded positions
        assert t.shape == (4, H, L, DH) and torch.equal(t.transpose(1, 2)[~am.bool()], torch.zeros_like(
            t.transpose(1, 2)[~am.bool()]))


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _valid_loss(out, am):
    keep = am.bool()
    g = torch.Generator().manual_seed(9)
    w1 = torch.randn(int(keep.sum()), generator=g)
    w2 = torch.randn(int(keep.sum()), generator=g)
    return (out.start_logits[keep] * w1).sum() + (out.end_logits[keep] ** 2 * w2).sum()


@pytest.mark.parametrize("checkpointing", [False, True])
def test_gradients_equal_dense_sdpa(checkpointing):
    ids, am = _batch()
    kw = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    ref, fast = _model("sdpa", **kw).train(), _model("kdfast", **kw).train()
    if checkpointing:
        fast.gradient_checkpointing_enable()
    kdfast.hf.unpad_encoder(fast)
    _valid_loss(ref(input_ids=ids, attention_mask=am), am).backward()
    _valid_loss(fast(input_ids=ids, attention_mask=am), am).backward()
    ga, gb = _grads(ref), _grads(fast)
    assert ga.keys() == gb.keys() and len(ga) > 20
    for n in ga:
        _close(gb[n], ga[n], atol=1e-4, rtol=1e-3)


def test_training_with_dropout_runs():
    ids, am = _batch()
    fast = _model("kdfast").train()  # BERT default dropouts: attention runs the op's reference path
    kdfast.hf.unpad_encoder(fast)
    out = fast(input_ids=ids, attention_mask=am, start_positions=torch.tensor([3, 2, 1, 0]),
               end_positions=torch.tensor([5, 4, 2, 0]))
    out.loss.backward()
    assert torch.isfinite(out.loss) and fast.bert.encoder.layer[0].attention.self.query.weight.grad.abs().sum() > 0


def _gated(seed=0):
    model = _model("kdfast", seed=seed, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    gates = kc.add_gates(model, heads=True, ffn=True, layers=True)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for hg in gates.head:
            hg.log_alpha.copy_(torch.randn(H, generator=g) * 3)
        for fg in gates.ffn:
            fg.log_alpha.copy_(torch.randn(160, generator=g) * 3)
        gates.head[1].log_alpha.fill_(-10.0)  # a fully pruned attention
    return model.eval(), gates  # (the new gate modules start in training mode)


def _eval_and_training_match(stock, fast, ids, am, *, seed, gate_name):
    """Eval logits at valid positions equal; in training (sampled gates, same seed and call order)
    the gradients of every parameter, gates named ``gate_name`` included, equal. Returns the stock
    model's eval start logits."""
    keep = am.bool()
    with torch.no_grad():
        a = stock(input_ids=ids, attention_mask=am).start_logits
        b = fast(input_ids=ids, attention_mask=am).start_logits
    _close(b[keep], a[keep])
    stock.train(), fast.train()
    torch.manual_seed(seed)
    _valid_loss(stock(input_ids=ids, attention_mask=am), am).backward()
    torch.manual_seed(seed)
    _valid_loss(fast(input_ids=ids, attention_mask=am), am).backward()
    ga, gb = _grads(stock), _grads(fast)
    assert any(gate_name in n for n in ga) and ga.keys() == gb.keys()
    for n in ga:
        _close(gb[n], ga[n], atol=1e-4, rtol=1e-3)
    return a


def test_gates_eval_and_training_gradients():
    ids, am = _batch()
    stock, _ = _gated()
    fast, _ = _gated()
    kdfast.hf.unpad_encoder(fast)
    _eval_and_training_match(stock, fast, ids, am, seed=11, gate_name="log_alpha")


def test_compacted_uneven_model():
    ids, am = _batch()
    keep = am.bool()
    heads = [torch.tensor([1, 0, 1, 0, 1, 1]), torch.zeros(H), torch.tensor([0, 0, 0, 0, 0, 1])]
    ffn = [torch.rand(160, generator=torch.Generator().manual_seed(i)) > 0.6 for i in range(3)]
    ffn[2] = torch.zeros(160)  # FFN fully pruned
    ref, fast = _model("sdpa"), _model("kdfast")
    with torch.no_grad():  # the same pruning on the dense sdpa model by zeroing input columns
        for i, layer in enumerate(ref.bert.encoder.layer):
            layer.attention.output.dense.weight.mul_(heads[i].float().repeat_interleave(DH)[None])
            layer.output.dense.weight.mul_(ffn[i].float()[None])
    kc.compact(fast, heads=heads, ffn=ffn)
    from kdfast.compress.compact import _NoAttention
    assert isinstance(fast.bert.encoder.layer[1].attention.self, _NoAttention)
    kdfast.hf.unpad_encoder(fast)
    with torch.no_grad():
        a = ref(input_ids=ids, attention_mask=am)
        b = fast(input_ids=ids, attention_mask=am)
    _close(b.start_logits[keep], a.start_logits[keep])
    _close(b.end_logits[keep], a.end_logits[keep])


def test_capture_records_qkv_equal_to_dense_at_valid_positions():
    ids, am = _batch()
    keep = am.bool()
    stock, fast = _model("kdfast"), _model("kdfast")
    kdfast.hf.unpad_encoder(fast)
    with torch.no_grad():
        with kdfast.hf.capture(stock) as ca:
            stock(input_ids=ids, attention_mask=am)
        with kdfast.hf.capture(fast) as cb:
            fast(input_ids=ids, attention_mask=am)
    assert len(cb) == 3 and torch.equal(cb.mask, am.bool())
    for la, lb in zip(ca.layers, cb.layers):
        for ta, tb in zip(la, lb):
            _close(tb.transpose(1, 2)[keep], ta.transpose(1, 2)[keep])


def test_capture_keeps_the_packed_attention_and_pads_only_what_it_keeps(monkeypatch):
    ids, am = _batch()
    fast, other = _model("kdfast"), _model("kdfast", seed=3)
    kdfast.hf.unpad_encoder(fast)
    kdfast.hf.unpad_encoder(other)
    calls = {"varlen": 0, "padded": 0}
    real_varlen, real_pad = hfu.attention_varlen, hfu._pad_heads

    def varlen(*a, **k):
        calls["varlen"] += 1
        return real_varlen(*a, **k)

    def pad(*a, **k):
        calls["padded"] += 1
        return real_pad(*a, **k)
    monkeypatch.setattr(hfu, "attention_varlen", varlen)
    monkeypatch.setattr(hfu, "_pad_heads", pad)
    with torch.no_grad(), kdfast.hf.capture(fast, layers=[1], keep="qk") as cap:
        fast(input_ids=ids, attention_mask=am)
        other(input_ids=ids, attention_mask=am)  # not captured: nothing padded for it
    assert calls == {"varlen": 6, "padded": 2}  # every layer packed; q and k of layer 1 only
    assert len(cap) == 3 and cap.layers[0] is None and cap.layers[2] is None
    q, k, v = cap.layers[1]
    assert v is None and q.shape == (4, H, L, DH) and k.shape == (4, H, L, DH)
    assert torch.equal(q.transpose(1, 2)[~am.bool()], torch.zeros_like(q.transpose(1, 2)[~am.bool()]))


def test_no_mask_runs_stock_forward():
    ids, am = _batch()
    stock, fast = _model("kdfast"), _model("kdfast")
    kdfast.hf.unpad_encoder(fast)
    with torch.no_grad():
        _close(fast(input_ids=ids).start_logits, stock(input_ids=ids).start_logits)  # every position


def test_output_hidden_states_on_packed_path():
    ids, am = _batch()
    keep = am.bool()
    stock, fast = _model("kdfast"), _model("kdfast")
    kdfast.hf.unpad_encoder(fast)
    with torch.no_grad():
        a = stock(input_ids=ids, attention_mask=am, output_hidden_states=True, output_attentions=True)
        b = fast(input_ids=ids, attention_mask=am, output_hidden_states=True, output_attentions=True)
        a2 = stock.bert(input_ids=ids, attention_mask=am, output_hidden_states=[1, 3])
        b2 = fast.bert(input_ids=ids, attention_mask=am, output_hidden_states=[1, 3])
    assert len(b.hidden_states) == len(a.hidden_states) == 4 and b.attentions == a.attentions == ()
    torch.testing.assert_close(b.hidden_states[0], a.hidden_states[0])  # embeddings, padded positions too
    for ha, hb in zip(a.hidden_states[1:], b.hidden_states[1:]):
        _close(hb[keep], ha[keep])
        assert torch.equal(hb[~keep], torch.zeros_like(hb[~keep]))
    _close(b.start_logits[keep], a.start_logits[keep])
    assert [h is None for h in b2.hidden_states] == [h is None for h in a2.hidden_states]
    for ha, hb in zip(a2.hidden_states, b2.hidden_states):
        if ha is not None:
            _close(hb[keep], ha[keep])


def test_undo_restores_original_forward():
    ids, am = _batch()
    fast = _model("kdfast")
    enc = fast.bert.encoder
    with torch.no_grad():
        a = fast(input_ids=ids, attention_mask=am).start_logits
        handle = kdfast.hf.unpad_encoder(fast)
        assert kdfast.hf.unpad_encoder(fast) is not None  # second call: no-op
        b = fast(input_ids=ids, attention_mask=am).start_logits
        handle.remove()
        handle.remove()  # idempotent
        c = fast(input_ids=ids, attention_mask=am).start_logits
        with kdfast.hf.unpad_encoder(fast):
            assert kdfast.hf.is_unpadded(fast)
        assert not kdfast.hf.is_unpadded(fast)
    assert "forward" not in enc.__dict__ and enc.forward.__func__ is type(enc).forward
    assert not torch.equal(a, b)  # padded positions differ while unpadded
    assert torch.equal(a, c)


def test_errors():
    with pytest.raises(ValueError, match="attn_implementation='kdfast'"):
        kdfast.hf.unpad_encoder(_model("sdpa"))
    with pytest.raises(ValueError, match="BERT-family"):
        kdfast.hf.unpad_encoder(torch.nn.Sequential(torch.nn.Linear(3, 3)))
    with pytest.raises(TypeError, match="torch.nn.Module"):
        kdfast.hf.unpad_encoder("bert")
    torch.manual_seed(0)
    dec = BertModel(_config(is_decoder=True), add_pooling_layer=False)
    dec.set_attn_implementation("kdfast")
    with pytest.raises(ValueError, match="decoder"):
        kdfast.hf.unpad_encoder(dec)
    model = _model("kdfast")
    model.bert.encoder.layer[2].attention.self.key = torch.nn.Identity()
    with pytest.raises(ValueError, match=r"layer 2: attention.self.key"):
        kdfast.hf.unpad_encoder(model)
    assert not hfu.is_unpadded(model)


def test_layer_kd_losses_equal_with_unpadded_student_and_teacher():
    from kdfast.nn import LayerKD
    ids, am = _batch()
    losses = {"embedding": 1.0, "hidden": 1.0, "attention_score": 1.0, "attention_kl": 1.0, "value_relation": 1.0}
    results = []
    for unpad in (False, True):
        student, teacher = _model("kdfast", seed=1), _model("kdfast", seed=2, num_hidden_layers=3)
        if unpad:
            kdfast.hf.unpad_encoder(student)
            kdfast.hf.unpad_encoder(teacher)
        kd = LayerKD(student.config, teacher.config, mapping="uniform", losses=losses)
        with kdfast.hf.capture(student) as cs, kdfast.hf.capture(teacher) as ct:
            s = student(input_ids=ids, attention_mask=am, output_hidden_states=True)
            with torch.no_grad():
                t = teacher(input_ids=ids, attention_mask=am, output_hidden_states=True)
        total, terms = kd(s.hidden_states, cs.layers, t.hidden_states, ct.layers, am)
        total.backward()
        results.append((terms, student.bert.encoder.layer[0].attention.self.query.weight.grad.clone()))
    (ta, ga), (tb, gb) = results
    assert ta.keys() == tb.keys() == losses.keys()
    for k in ta:
        _close(tb[k], ta[k], atol=1e-4, rtol=1e-4)
    _close(gb, ga, atol=1e-4, rtol=1e-3)


def test_bfloat16_error_like_the_stock_model():
    ids, am = _batch()
    keep = am.bool()
    ref = _model("kdfast")
    stock, fast = _model("kdfast").to(torch.bfloat16), _model("kdfast").to(torch.bfloat16)
    kdfast.hf.unpad_encoder(fast)
    with torch.no_grad():
        r = ref(input_ids=ids, attention_mask=am).start_logits[keep]
        a = stock(input_ids=ids, attention_mask=am).start_logits[keep].float()
        b = fast(input_ids=ids, attention_mask=am).start_logits[keep]
    assert b.dtype == torch.bfloat16
    err_stock, err_fast = (a - r).abs().max().item(), (b.float() - r).abs().max().item()
    assert err_fast <= 2 * err_stock + 1e-2, (err_fast, err_stock)


def test_linears_see_only_valid_tokens():
    ids, am = _batch()
    fast = _model("kdfast")
    kdfast.hf.unpad_encoder(fast)
    rows = []
    layer = fast.bert.encoder.layer[1]
    hooks = [m.register_forward_hook(lambda m, a, o: rows.append(a[0].shape[0]))
             for m in (layer.attention.self.query, layer.attention.output.dense, layer.intermediate.dense,
                       layer.output.dense)]
    with torch.no_grad():
        fast(input_ids=ids, attention_mask=am)
    for h in hooks:
        h.remove()
    assert rows == [int(am.sum())] * 4  # 79 valid tokens of 4 x 41


def test_hidden_gate_and_hidden_compaction():
    # CoFi hidden-dimension gate: hooks on the residual writers and gated LayerNorms act on packed tokens too.
    ids, am = _batch()
    keep = am.bool()
    models = []
    for _ in range(2):
        m = _model("kdfast", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        gates = kc.add_gates(m, heads=True, ffn=True, hidden=True)
        g = torch.Generator().manual_seed(6)
        with torch.no_grad():
            for hg in gates.head:
                hg.log_alpha.copy_(torch.randn(H, generator=g) * 3)
            gates.hidden.log_alpha.copy_(torch.randn(H * DH, generator=g) * 3)
        models.append(m.eval())
    stock, fast = models
    kdfast.hf.unpad_encoder(fast)
    a = _eval_and_training_match(stock, fast, ids, am, seed=12, gate_name="hidden")
    # compaction removes the pruned hidden dims (hidden_size < 96): the unpadded encoder follows
    for m in (stock, fast):
        m.eval()
        kc.compact(m)
    assert fast.config.hidden_size < H * DH
    with torch.no_grad():
        c = stock(input_ids=ids, attention_mask=am).start_logits
        d = fast(input_ids=ids, attention_mask=am).start_logits
    _close(d[keep], c[keep])
    _close(c[keep], a[keep])


@pytest.mark.cpu
def test_packed_attention_with_dropout_equals_dense_kdfast(monkeypatch):
    # Right-padded rows: the attention runs on packed [T, H, d] q/k/v (attention_varlen; the
    # re-padding helper is never called), attention dropout on; its masks are the dense model's
    # (counters of (b, h, i, j) with the padded length), so with the same seed the loss and
    # gradients equal the dense kdfast model with zero_padded_queries (hidden dropout off).
    import importlib
    unpad = importlib.import_module("kdfast.hf.unpad")
    kw = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.2)
    ref, fast = _model("kdfast", **kw).train(), _model("kdfast", **kw).train()
    kdfast.hf.unpad_encoder(fast)
    monkeypatch.setattr(unpad, "_pad_heads", lambda *a: (_ for _ in ()).throw(AssertionError("re-padded")))
    ids, am = _batch()
    prev = kdfast.hf.attention.set_options(zero_padded_queries=True)
    try:
        torch.manual_seed(7)
        la = _valid_loss(ref(input_ids=ids, attention_mask=am), am)
    finally:
        kdfast.hf.attention.set_options(**prev)
    torch.manual_seed(7)
    lb = _valid_loss(fast(input_ids=ids, attention_mask=am), am)
    _close(lb, la)
    la.backward()
    lb.backward()
    ga, gb = _grads(ref), _grads(fast)
    for n in ga:
        _close(gb[n], ga[n], atol=1e-4, rtol=1e-3)


def test_packed_attention_device_rule(monkeypatch):
    # CPU tensors: the CPU varlen kernels; CUDA tensors: packed only when the Triton varlen kernels can
    # run (backends.plan, no GPU needed), else re-padded q/k/v.
    from kdfast import backends
    assert hfu._packed_attention_on(torch.device("cpu"))
    assert hfu._packed_attention_on(torch.device("cuda")) == (backends.triton_available() is None)
    monkeypatch.setenv("KDFAST_DISABLE_TRITON", "1")
    assert not hfu._packed_attention_on(torch.device("cuda"))
    assert hfu._packed_attention_on(torch.device("cpu"))


@pytest.mark.triton
def test_packed_attention_on_triton_varlen_kernels_equals_cpu_kernels(monkeypatch):
    # The path CUDA tensors take with Triton, run on CPU tensors under the interpreter: packed q/k/v
    # through the Triton varlen kernels (never re-padded), attention dropout on; same seed, same masks,
    # so the loss and gradients equal those of the CPU varlen kernels.
    import importlib
    unpad = importlib.import_module("kdfast.hf.unpad")
    kw = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.2, num_hidden_layers=1)
    ref, fast = _model("kdfast", **kw).train(), _model("kdfast", **kw).train()
    for m in (ref, fast):
        kdfast.hf.unpad_encoder(m)
    monkeypatch.setattr(unpad, "_pad_heads", lambda *a: (_ for _ in ()).throw(AssertionError("re-padded")))
    ids, am = _batch()
    torch.manual_seed(7)
    la = _valid_loss(ref(input_ids=ids, attention_mask=am), am)
    torch.manual_seed(7)
    with kdfast.use_backend("triton", ops=["attention_varlen", "attention_varlen_bwd"]):
        lb = _valid_loss(fast(input_ids=ids, attention_mask=am), am)
        lb.backward()
    la.backward()
    _close(lb, la)
    ga, gb = _grads(ref), _grads(fast)
    for n in ga:
        _close(gb[n], ga[n], atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("act_bits", [None, 8])
def test_ternary_qat_model_unpadded_equals_padded(act_bits):
    """Ternary QAT students (TernaryLinear q/k/v, per-token int8 activations or none) train unpadded:
    outputs and gradients equal the same model's padded kdfast forward at valid positions."""
    ids, am = _batch()
    kw = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    ref, fast = _model("kdfast", **kw).train(), _model("kdfast", **kw).train()
    kc.quantize(ref, qat=True, act_bits=act_bits)
    kc.quantize(fast, qat=True, act_bits=act_bits)
    assert type(fast.bert.encoder.layer[0].attention.self.query).__name__ == "TernaryLinear"
    kdfast.hf.unpad_encoder(fast)
    assert kdfast.hf.is_unpadded(fast)
    a, b = ref(input_ids=ids, attention_mask=am), fast(input_ids=ids, attention_mask=am)
    keep = am.bool()
    _close(b.start_logits[keep], a.start_logits[keep], atol=1e-4, rtol=1e-3)
    _valid_loss(a, am).backward()
    _valid_loss(b, am).backward()
    ga, gb = _grads(ref), _grads(fast)
    assert ga.keys() == gb.keys() and len(ga) > 20
    for n in ga:
        _close(gb[n], ga[n], atol=2e-4, rtol=2e-3)
