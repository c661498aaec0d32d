"""TernaryLinear: from_linear, QAT with straight-through gradients, packed eval path, state_dict."""
import io

import pytest
import torch
from torch import nn

from kdfast.nn import TernaryLinear
from kdfast.ops import ternarize, ternary_linear_reference


def _linear(K=70, N=9, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(K, N)
    with torch.no_grad():
        lin.weight.mul_(3.0)
    return lin


def _nbytes(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    return buf.tell()


@pytest.mark.parametrize("method", ["twn", "absmean", "lat"])
@pytest.mark.parametrize("granularity", ["row", "tensor"])
@pytest.mark.parametrize("act_bits", [None, 8])
def test_from_linear_inference_matches_reference(method, granularity, act_bits):
    lin = _linear()
    t = TernaryLinear.from_linear(lin, method=method, granularity=granularity, act_bits=act_bits).eval()
    assert t.weight is None and t.packed_weight.dtype == torch.uint8
    codes, scale = ternarize(lin.weight, method, granularity)
    torch.testing.assert_close(t.dequantized_weight(), codes.float() * scale.reshape(-1, 1))
    x = torch.randn(2, 5, 70) * 10
    ref = ternary_linear_reference(x.reshape(10, 70), t.packed_weight, t.weight_scale, lin.bias.detach(),
                                   act_bits=act_bits).reshape(2, 5, 9)
    torch.testing.assert_close(t(x), ref, rtol=1e-5, atol=1e-4)


def test_qat_ste_gradients():
    lin = _linear()
    clip = 0.2  # some |W| > clip, so the STE mask matters
    t = TernaryLinear.from_linear(lin, qat=True, clip=clip).train()
    x = (torch.randn(4, 70) * 10).requires_grad_()
    g = torch.randn(4, 9)
    (t(x) * g).sum().backward()
    w = lin.weight.detach()
    codes, scale = ternarize(w, "twn", "row", clip=clip)
    wq = codes.float() * scale[:, None]
    mask = (w.abs() <= clip).float()
    assert 0 < mask.mean() < 1
    torch.testing.assert_close(t.weight.grad, (g.T @ x.detach()) * mask)
    torch.testing.assert_close(x.grad, g @ wq)
    torch.testing.assert_close(t.bias.grad, g.sum(0))


def test_qat_act_bits_forward_and_grad():
    t = TernaryLinear.from_linear(_linear(), qat=True, act_bits=8).train()
    x = (torch.randn(3, 70) * 10).requires_grad_()
    y = t(x)
    t.eval()
    with torch.no_grad():
        torch.testing.assert_close(y, t(x), rtol=1e-5, atol=1e-4)  # fake quant == packed W2A8 kernel
    g = torch.randn(3, 9)
    (y * g).sum().backward()
    torch.testing.assert_close(x.grad, g @ t.dequantized_weight())  # straight through


def test_eval_repacks_after_update():
    t = TernaryLinear.from_linear(_linear(), qat=True)
    x = torch.randn(2, 70)
    t.eval()
    y0 = t(x)
    with torch.no_grad():
        t.weight.mul_(-1)
    torch.testing.assert_close(t(x) - t.bias, -(y0 - t.bias), rtol=1e-5, atol=1e-5)


def test_state_dict_packed_and_small():
    lin = nn.Linear(768, 768)
    t = TernaryLinear.from_linear(lin)
    sd = t.state_dict()
    assert set(sd) == {"packed_weight", "weight_scale", "bias"}
    assert sd["packed_weight"].shape == (768, 192)
    ratio = _nbytes(lin.state_dict()) / _nbytes(sd)
    assert ratio > 12, ratio
    # QAT form also stores packed weights (plus its latent weight)
    q = TernaryLinear.from_linear(lin, qat=True)
    assert {"packed_weight", "weight_scale", "weight", "bias"} == set(q.state_dict())
    # round trip into a fresh module
    fresh = TernaryLinear(768, 768)
    fresh.load_state_dict(sd)
    x = torch.randn(3, 768)
    torch.testing.assert_close(fresh(x), t(x))


def test_freeze_and_no_bias():
    t = TernaryLinear.from_linear(nn.Linear(20, 3, bias=False), qat=True)
    assert t.bias is None and t.qat
    t.freeze()
    assert not t.qat and set(t.state_dict()) == {"packed_weight", "weight_scale"}
    assert t(torch.randn(2, 20)).shape == (2, 3)


def test_compile_module():
    t = TernaryLinear.from_linear(_linear(), act_bits=8).eval()
    x = torch.randn(4, 70)
    f = torch.compile(t, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(f(x), t(x))


def test_errors():
    with pytest.raises(ValueError, match="method"):
        TernaryLinear(4, 4, method="x")
    with pytest.raises(ValueError, match="act_bits"):
        TernaryLinear(4, 4, act_bits=4)
    with pytest.raises(TypeError, match="nn.Linear"):
        TernaryLinear.from_linear(nn.Conv1d(2, 2, 1))
    with pytest.raises(ValueError, match="16 \\* ceil"):
        TernaryLinear(70, 3)(torch.randn(2, 64))
