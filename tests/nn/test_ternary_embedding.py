"""TernaryEmbedding against a float64 reference of the math: quantize / dequantize, packed lookup, STE
gradient, padding_idx, state_dict, errors."""
import io

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from kdfast.nn import TernaryEmbedding
from kdfast.ops import ternarize, unpack_ternary

V, D = 301, 70  # D not a multiple of 64: the last packed block is padded


def _embedding(V=V, D=D, padding_idx=None, seed=0):
    torch.manual_seed(seed)
    emb = nn.Embedding(V, D, padding_idx=padding_idx)
    with torch.no_grad():
        emb.weight.mul_(0.05)  # BERT-like magnitude
    return emb


def _twn_row_reference(w, clip=2.5):
    """TWN with a scale per row, in float64: delta = 0.7 mean|Wc|, scale = mean of the kept |Wc|."""
    w = w.double().clamp(-clip, clip)
    a = w.abs()
    keep = a > 0.7 * a.mean(1, keepdim=True)
    scale = (a * keep).sum(1) / keep.sum(1).clamp_min(1)
    return torch.sign(w) * keep, scale


def _ids(V=V, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (5, 3, 7), generator=g)
    ids[0, 0, :3] = ids[1, 1, 1]  # repeated ids
    return ids.transpose(0, 2)  # non-contiguous view


def _nbytes(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    return buf.tell()


def test_quantize_dequantize_round_trip_matches_float64_reference():
    emb = _embedding()
    t = TernaryEmbedding.from_embedding(emb)
    assert t.weight is None and t.packed_weight.shape == (V, 32) and t.weight_scale.shape == (V,)
    codes, scale = _twn_row_reference(emb.weight)
    torch.testing.assert_close(unpack_ternary(t.packed_weight, D).double(), codes, rtol=0, atol=0)
    torch.testing.assert_close(t.weight_scale.double(), scale, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(t.dequantized_weight(torch.float64), codes * scale[:, None], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("method", ["twn", "absmean", "lat"])
@pytest.mark.parametrize("granularity", ["row", "tensor"])
def test_packed_lookup_equals_dense_lookup(method, granularity):
    emb = _embedding()
    t = TernaryEmbedding.from_embedding(emb, method=method, granularity=granularity).eval()
    codes, scale = ternarize(emb.weight.double(), method, granularity)
    torch.testing.assert_close(t.dequantized_weight(torch.float64), codes.double() * scale.double().reshape(-1, 1),
                               rtol=1e-6, atol=1e-9)
    ids = _ids()
    out = t(ids)
    assert out.shape == (*ids.shape, D) and out.dtype == torch.float32
    assert torch.equal(out, F.embedding(ids, t.dequantized_weight()))
    assert torch.equal(t(ids.int()), out)
    assert t(torch.empty(0, 4, dtype=torch.long)).shape == (0, 4, D)


@pytest.mark.parametrize("granularity", ["row", "tensor"])
def test_qat_forward_and_ste_gradient(granularity):
    emb = _embedding(padding_idx=3)
    w = emb.weight.detach()
    clip = float(w.abs().quantile(0.8))  # some |W| > clip, so the STE mask matters
    t = TernaryEmbedding.from_embedding(emb, granularity=granularity, qat=True, clip=clip).train()
    ids = _ids()
    ids[0, 0, 0] = 3
    g = torch.randn(*ids.shape, D, dtype=torch.float64)
    out = t(ids)
    torch.testing.assert_close(out, F.embedding(ids, t.dequantized_weight()), rtol=0, atol=0)
    (out.double() * g).sum().backward()
    w64 = w.double().requires_grad_()
    (F.embedding(ids, w64, padding_idx=3) * g).sum().backward()  # gradient of the dense lookup
    mask = (w.abs() <= clip).double()
    assert 0 < mask.mean() < 1
    torch.testing.assert_close(t.weight.grad.double(), w64.grad * mask, rtol=1e-6, atol=1e-7)
    assert t.weight.grad[3].abs().sum() == 0
    t.eval()  # eval reads the packed table made from the latent one
    assert torch.equal(t(ids), out.detach())


def test_eval_repacks_after_update_and_freeze():
    t = TernaryEmbedding.from_embedding(_embedding(), qat=True).eval()
    ids = _ids()
    y0 = t(ids)
    with torch.no_grad():
        t.weight.mul_(-1)
    assert torch.equal(t(ids), -y0)
    t.freeze()
    assert not t.qat and set(t.state_dict()) == {"packed_weight", "weight_scale"}
    assert torch.equal(t(ids), -y0)


def test_padding_idx_preserved():
    t = TernaryEmbedding(10, 9, padding_idx=-1, qat=True)
    assert t.padding_idx == 9 and t.weight[9].abs().sum() == 0
    ids = torch.tensor([[9, 1, 9]])
    assert t.eval()(ids)[0, 0].abs().sum() == 0  # a zero row ternarizes to zero codes
    t.train()
    t(ids).sum().backward()
    assert t.weight.grad[9].abs().sum() == 0 and t.weight.grad[1].abs().sum() > 0
    emb = _embedding(padding_idx=0)
    p = TernaryEmbedding.from_embedding(emb)
    assert p.padding_idx == 0 and p(torch.tensor([0])).abs().sum() == 0
    assert "padding_idx=0" in repr(p)


def test_state_dict_packed_small_and_loadable():
    emb = _embedding(2000, 128)
    t = TernaryEmbedding.from_embedding(emb)
    sd = t.state_dict()
    assert set(sd) == {"packed_weight", "weight_scale"}
    assert _nbytes(emb.state_dict()) / _nbytes(sd) > 12
    q = TernaryEmbedding.from_embedding(emb, qat=True)
    assert set(q.state_dict()) == {"packed_weight", "weight_scale", "weight"}
    fresh = TernaryEmbedding(2000, 128)
    fresh.load_state_dict(sd)
    ids = torch.randint(0, 2000, (4, 33))
    assert torch.equal(fresh(ids), t(ids))


def test_compile_packed_lookup():
    t = TernaryEmbedding.from_embedding(_embedding()).eval()
    ids = _ids().contiguous()
    f = torch.compile(t, fullgraph=True, backend="aot_eager")
    assert torch.equal(f(ids), t(ids))


def test_errors():
    with pytest.raises(ValueError, match="num_embeddings"):
        TernaryEmbedding(0, 4)
    with pytest.raises(ValueError, match="embedding_dim"):
        TernaryEmbedding(4, -1)
    with pytest.raises(ValueError, match="padding_idx"):
        TernaryEmbedding(4, 4, padding_idx=4)
    with pytest.raises(ValueError, match="method"):
        TernaryEmbedding(4, 4, method="x")
    with pytest.raises(ValueError, match="granularity"):
        TernaryEmbedding(4, 4, granularity="column")
    with pytest.raises(ValueError, match="clip"):
        TernaryEmbedding(4, 4, clip=0)
    with pytest.raises(TypeError, match="nn.Embedding"):
        TernaryEmbedding.from_embedding(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="max_norm"):
        TernaryEmbedding.from_embedding(nn.Embedding(4, 4, max_norm=1.0))
    with pytest.raises(TypeError, match="ids"):
        TernaryEmbedding(4, 4)(torch.zeros(2))
