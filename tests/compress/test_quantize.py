"""kdfast.compress.quantize / freeze / save_quantized / load_quantized."""
import os

import pytest
import torch
from torch import nn

from kdfast.compress import freeze, load_quantized, quantize, save_quantized
from kdfast.nn import TernaryLinear


class Tiny(nn.Module):
    """Encoder-ish stack with a QA head (kept in full precision by default)."""

    def __init__(self, d=96, ff=192, layers=2):
        super().__init__()
        self.layers = nn.ModuleList(nn.ModuleDict({"q": nn.Linear(d, d), "ff1": nn.Linear(d, ff),
                                                   "ff2": nn.Linear(ff, d)}) for _ in range(layers))
        self.qa_outputs = nn.Linear(d, 2)

    def forward(self, x):
        for layer in self.layers:
            x = x + layer["q"](x)
            x = x + layer["ff2"](torch.relu(layer["ff1"](x)))
        return self.qa_outputs(x)


def test_quantize_replaces_and_skips_head():
    torch.manual_seed(0)
    m = quantize(Tiny(), act_bits=8)
    kinds = {n: type(mod) for n, mod in m.named_modules() if isinstance(mod, nn.Linear | TernaryLinear)}
    assert kinds["qa_outputs"] is nn.Linear
    assert sum(k is TernaryLinear for k in kinds.values()) == 6
    assert all(not mod.qat for mod in m.modules() if isinstance(mod, TernaryLinear))
    assert not any(k.endswith(".weight") and "qa_outputs" not in k for k in m.state_dict())
    m2 = quantize(Tiny(), skip=None)
    assert isinstance(m2.qa_outputs, TernaryLinear)


def test_save_load_roundtrip_and_size(tmp_path):
    torch.manual_seed(0)
    d, ff = 256, 1024
    fp = Tiny(d, ff, layers=2)
    fp.qa_outputs = nn.Identity()  # measure the encoder's linear layers only
    torch.save(fp.state_dict(), tmp_path / "fp32.pt")
    q = quantize(fp, method="twn", act_bits=8)
    q.eval()
    x = torch.randn(3, 5, d)
    y = q(x)
    save_quantized(q, tmp_path / "t.pt")
    ratio = os.path.getsize(tmp_path / "fp32.pt") / os.path.getsize(tmp_path / "t.pt")
    assert ratio > 12, ratio
    fresh = Tiny(d, ff, layers=2)
    fresh.qa_outputs = nn.Identity()
    load_quantized(fresh, tmp_path / "t.pt").eval()
    assert isinstance(fresh.layers[0]["q"], TernaryLinear) and fresh.layers[0]["q"].act_bits == 8
    torch.testing.assert_close(fresh(x), y)


def test_qat_then_freeze():
    torch.manual_seed(0)
    m = quantize(Tiny(), qat=True)
    opt = torch.optim.SGD(m.parameters(), lr=1e-2)
    x = torch.randn(4, 96)
    m.train()
    before = m.layers[0]["q"].weight.detach().clone()
    m(x).pow(2).sum().backward()
    opt.step()
    assert not torch.equal(before, m.layers[0]["q"].weight)
    m.eval()
    y = m(x)
    freeze(m)
    assert all(not mod.qat for mod in m.modules() if isinstance(mod, TernaryLinear))
    torch.testing.assert_close(m(x), y)


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="method"):
        quantize(Tiny(), method="nope")
    torch.save({"x": 1}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="not a kdfast ternary checkpoint"):
        load_quantized(Tiny(), tmp_path / "bad.pt")


def test_hf_bert_qa_model(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=128, max_position_embeddings=32)
    torch.manual_seed(0)
    model = transformers.BertForQuestionAnswering(cfg).eval()
    ids = torch.randint(0, 100, (2, 11))
    quantize(model, act_bits=8)
    assert type(model.qa_outputs) is nn.Linear
    assert isinstance(model.bert.encoder.layer[0].attention.self.query, TernaryLinear)
    with torch.no_grad():
        out = model(input_ids=ids)
    save_quantized(model, tmp_path / "qa.pt")
    fresh = transformers.BertForQuestionAnswering(cfg).eval()
    load_quantized(fresh, tmp_path / "qa.pt")
    with torch.no_grad():
        again = fresh(input_ids=ids)
    torch.testing.assert_close(again.start_logits, out.start_logits)
    torch.testing.assert_close(again.end_logits, out.end_logits)


def test_fully_pruned_sublayer_is_left_alone(tmp_path):
    """compact() leaves a zero-width Linear where a whole FFN was pruned: quantize keeps it (nothing to
    ternarize) and quantizes the rest; the model still runs, trains (QAT) and round-trips."""
    transformers = pytest.importorskip("transformers")
    import kdfast.hf  # noqa: F401
    from kdfast.compress import compact
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=128, max_position_embeddings=32)
    torch.manual_seed(0)
    model = transformers.BertForQuestionAnswering._from_config(cfg, attn_implementation="kdfast").eval()
    compact(model, ffn=[torch.zeros(128), torch.ones(128)])
    empty = model.bert.encoder.layer[0].output.dense
    assert empty.in_features == 0
    quantize(model, qat=True)
    assert type(model.bert.encoder.layer[0].output.dense) is nn.Linear
    assert isinstance(model.bert.encoder.layer[1].output.dense, TernaryLinear)
    ids = torch.randint(0, 100, (2, 11))
    model.train()
    model(input_ids=ids).start_logits.sum().backward()
    freeze(model.eval())
    with torch.no_grad():
        out = model(input_ids=ids).start_logits
    assert torch.isfinite(out).all()
    save_quantized(model, tmp_path / "q.pt")
    obj = torch.load(tmp_path / "q.pt", weights_only=True)
    assert "bert.encoder.layer.0.output.dense" not in obj["kdfast_ternary"]
