"""kdfast.compress.quantize / freeze / save_quantized / load_quantized."""
import os

import pytest
import torch
from torch import nn

from kdfast.compress import freeze, load_quantized, quantize, save_quantized
from kdfast.nn import TernaryEmbedding, TernaryLinear


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


# --- embeddings= and float_dtype= ------------------------------------------------------------------------
def _bert(vocab=100, positions=32):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=128, max_position_embeddings=positions, pad_token_id=0)
    torch.manual_seed(0)
    return transformers.BertForQuestionAnswering(cfg).eval(), cfg


def transformers_model(cfg):
    import transformers
    return transformers.BertForQuestionAnswering(cfg).eval()


def _logits(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids, token_type_ids=(ids % 2))
    return out.start_logits, out.end_logits


EMB = "bert.embeddings."


@pytest.mark.parametrize("embeddings,expected", [
    (None, set()), ((), set()), ("word", {"word_embeddings"}),
    ("all", {"word_embeddings", "position_embeddings", "token_type_embeddings"}),
    ("*position*", {"position_embeddings"}), (["word", "*token_type*"], {"word_embeddings", "token_type_embeddings"})])
def test_quantize_embeddings_choice(embeddings, expected):
    model, _ = _bert()
    quantize(model, embeddings=embeddings)
    got = {n[len(EMB):] for n, m in model.named_modules() if isinstance(m, TernaryEmbedding)}
    assert got == expected
    assert {k[len(EMB):] for k, c in model.kdfast_ternary.items() if c["kind"] == "embedding"} == expected
    assert isinstance(model.bert.encoder.layer[0].attention.self.query, TernaryLinear)
    assert model.get_input_embeddings() is model.bert.embeddings.word_embeddings


def test_quantize_embeddings_errors():
    model, _ = _bert()
    with pytest.raises(ValueError, match="'\\*nope\\*' matches no nn.Embedding.*word_embeddings"):
        quantize(model, embeddings="*nope*")
    with pytest.raises(ValueError, match="embeddings='word' needs .*get_input_embeddings"):
        quantize(Tiny(), embeddings="word")
    with pytest.raises(TypeError, match="embeddings"):
        quantize(model, embeddings=[3])
    transformers = pytest.importorskip("transformers")
    mlm = transformers.BertForMaskedLM(transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1,
                                                               num_attention_heads=2, intermediate_size=64))
    assert mlm.get_output_embeddings().weight is mlm.get_input_embeddings().weight
    with pytest.raises(ValueError, match="tied to the output embedding"):
        quantize(mlm, embeddings="word")


@pytest.mark.parametrize("float_dtype", [None, "float16", torch.bfloat16])
def test_save_load_with_embeddings_identical_outputs(tmp_path, float_dtype):
    model, cfg = _bert()
    ids = torch.randint(0, 100, (3, 17))
    ids[:, -2:] = 0  # padding tokens
    quantize(model, act_bits=8, embeddings="all")
    save_quantized(model, tmp_path / "q.pt", float_dtype=float_dtype)
    obj = torch.load(tmp_path / "q.pt", weights_only=True)
    sd = obj["state_dict"]
    assert not any(k.endswith("embeddings.weight") for k in sd)  # only packed codes + scales
    stored = torch.float32 if float_dtype is None else {"float16": torch.float16}.get(float_dtype, float_dtype)
    assert sd[EMB + "LayerNorm.weight"].dtype == stored and sd["qa_outputs.weight"].dtype == stored
    assert sd[EMB + "word_embeddings.weight_scale"].dtype == stored
    if float_dtype is not None:  # what load gives back: the fp32 model with fp16/bf16-rounded full-precision tensors
        with torch.no_grad():
            for k, v in model.state_dict().items():
                if v.is_floating_point():
                    v.copy_(v.to(stored))
    expected = _logits(model, ids)
    fresh = transformers_model(cfg)
    load_quantized(fresh, tmp_path / "q.pt")
    assert isinstance(fresh.bert.embeddings.position_embeddings, TernaryEmbedding)
    assert fresh.bert.embeddings.word_embeddings.padding_idx == 0
    assert fresh.qa_outputs.weight.dtype == torch.float32
    for a, b in zip(_logits(fresh, ids), expected):
        assert torch.equal(a, b)
    assert fresh.kdfast_ternary == model.kdfast_ternary
    save_quantized(fresh, tmp_path / "again.pt")  # the recorded storage dtype is kept on a re-save
    assert torch.load(tmp_path / "again.pt", weights_only=True).get("kdfast_float_dtype") == \
        obj.get("kdfast_float_dtype")



def test_fp16_storage_halves_full_precision_tensors(tmp_path):
    model, _ = _bert(vocab=2000, positions=512)
    quantize(model, embeddings="word")
    save_quantized(model, tmp_path / "fp32.pt")
    save_quantized(model, tmp_path / "fp16.pt", float_dtype="float16")
    pos = 512 * 64 * 2  # the position table, stored fp16 instead of fp32, saves 2 bytes a weight
    assert os.path.getsize(tmp_path / "fp32.pt") - os.path.getsize(tmp_path / "fp16.pt") > pos


def test_freeze_qat_model_with_embeddings(tmp_path):
    model, cfg = _bert()
    ids = torch.randint(1, 100, (2, 11))
    quantize(model, qat=True, embeddings="word")
    word = model.bert.embeddings.word_embeddings
    assert word.qat
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    before = word.weight.detach().clone()
    model(input_ids=ids).start_logits.pow(2).sum().backward()
    assert word.weight.grad[ids.unique()].abs().sum() > 0
    opt.step()
    assert not torch.equal(before, word.weight)
    model.eval()
    expected = _logits(model, ids)
    save_quantized(model, tmp_path / "qat.pt")  # the QAT form round-trips with its latent weights
    resumed = load_quantized(transformers_model(cfg), tmp_path / "qat.pt")
    assert resumed.bert.embeddings.word_embeddings.qat
    freeze(model)
    assert not word.qat and all(not m.qat for m in model.modules() if isinstance(m, TernaryLinear))
    for a, b in zip(_logits(model, ids), expected):
        assert torch.equal(a, b)
    save_quantized(model, tmp_path / "frozen.pt")
    fresh = load_quantized(transformers_model(cfg), tmp_path / "frozen.pt")
    assert not fresh.bert.embeddings.word_embeddings.qat
    for a, b in zip(_logits(fresh, ids), expected):
        assert torch.equal(a, b)


def test_load_errors_for_mismatched_files(tmp_path):
    model, _ = _bert()
    quantize(model, embeddings="word")
    save_quantized(model, tmp_path / "q.pt", float_dtype="float16")
    other, _ = _bert(vocab=120)
    with pytest.raises(ValueError, match="word_embeddings is a 100 x 64 embedding in the file but .*120, 64"):
        load_quantized(other, tmp_path / "q.pt")
    obj = torch.load(tmp_path / "q.pt", weights_only=True)
    obj["state_dict"]["qa_outputs.bias"] = obj["state_dict"]["qa_outputs.bias"].float()
    with pytest.raises(ValueError, match="qa_outputs.bias is torch.float32 but the file records "
                                         "kdfast_float_dtype='float16'"):
        load_quantized(_bert()[0], obj)
    obj["kdfast_float_dtype"] = "float8"
    with pytest.raises(ValueError, match="kdfast_float_dtype must be None or one of"):
        load_quantized(_bert()[0], obj)
    with pytest.raises(ValueError, match="float_dtype must be None or one of"):
        save_quantized(model, tmp_path / "x.pt", float_dtype="int8")
    with pytest.raises(ValueError, match="which the model does not have"):
        load_quantized(Tiny(), tmp_path / "q.pt")
