"""Ternary quantizers, 2-bit packing and activation quantization (reference code)."""
import pytest
import torch

from kdfast.ops import dequantize_ternary, pack_ternary, quantize_activations, ternarize, unpack_ternary
from kdfast.ops.ternary_quant import packed_columns

W = torch.tensor([[0.9, -0.1, 0.3, -1.2],
                  [0.05, 0.0, -0.02, 0.4]])


def test_twn_by_hand():
    codes, scale = ternarize(W, "twn", "row")
    # row 0: mean|W| = 2.5 / 4 = 0.625, delta = 0.4375 -> keep 0.9, -1.2; scale = 1.05
    # row 1: mean|W| = 0.47 / 4 = 0.1175, delta = 0.08225 -> keep 0.4; scale = 0.4
    assert codes.dtype == torch.int8
    assert codes.tolist() == [[1, 0, 0, -1], [0, 0, 0, 1]]
    torch.testing.assert_close(scale, torch.tensor([1.05, 0.4]))


def test_twn_tensor_and_clip():
    codes, scale = ternarize(W, "twn", "tensor")
    # mean|W| = 2.97 / 8 = 0.37125, delta = 0.259875 -> keep 0.9, 0.3, -1.2, 0.4; scale = 2.8 / 4
    assert codes.tolist() == [[1, 0, 1, -1], [0, 0, 0, 1]]
    assert scale.shape == (1,)
    torch.testing.assert_close(scale, torch.tensor([0.7]))
    # clip 1.0: |-1.2| -> 1.0, row0 mean 2.3/4 = .575, delta .4025 -> keep .9, -1.0; scale .95
    _, s = ternarize(W, "twn", "row", clip=1.0)
    torch.testing.assert_close(s[0], torch.tensor(0.95))


def test_absmean_by_hand():
    codes, scale = ternarize(W, "absmean", "row")
    # row 0: gamma = 0.625 -> W/gamma = 1.44, -0.16, 0.48, -1.92 -> 1, 0, 0, -1
    # row 1: gamma = 0.1175 -> 0.43, 0, -0.17, 3.4 -> 0, 0, 0, 1
    assert codes.tolist() == [[1, 0, 0, -1], [0, 0, 0, 1]]
    torch.testing.assert_close(scale, torch.tensor([0.625, 0.1175]))


def test_lat_refines_to_a_fixed_point():
    w = torch.tensor([[1.0, 0.9, 0.2, -0.35, 0.0, 0.1]])
    codes, scale = ternarize(w, "lat", "row", iters=5)
    # fixed point of keep = |w| > s/2, s = mean kept: keep 1, .9, -.35 -> s = .75, s/2 = .375 > .35?
    # then keep 1, .9 -> s = .95 (stable: .475 > .35)
    assert codes.tolist() == [[1, 1, 0, 0, 0, 0]]
    torch.testing.assert_close(scale, torch.tensor([0.95]))
    # lat never has a larger L2 error than twn
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 300, generator=g) * 0.05
    err = {}
    for m in ("twn", "lat"):
        c, s = ternarize(w, m)
        err[m] = (w - c.float() * s[:, None]).pow(2).sum().item()
    assert err["lat"] <= err["twn"] + 1e-9


def test_all_zero_row_gets_zero_scale():
    codes, scale = ternarize(torch.zeros(2, 5), "twn")
    assert codes.abs().sum() == 0 and torch.equal(scale, torch.zeros(2))


@pytest.mark.parametrize("K", [1, 7, 769, 3072])
def test_pack_round_trip(K):
    g = torch.Generator().manual_seed(K)
    N = 13
    codes = torch.randint(-1, 2, (N, K), generator=g, dtype=torch.int8)
    p = pack_ternary(codes)
    assert p.dtype == torch.uint8 and p.shape == (N, packed_columns(K)) == (N, 16 * ((K + 63) // 64))
    assert torch.equal(unpack_ternary(p, K), codes)


def test_pack_layout_by_hand():
    # weight k = 64 b + 16 i + j lives in byte 16 b + j, bits 2i..2i+1, code = w + 1
    codes = torch.zeros(1, 70, dtype=torch.int8)
    codes[0, 16 * 2 + 3] = 1     # b=0, i=2, j=3 -> byte 3 gets code 2 at bits 4-5 (others code 1)
    codes[0, 64 + 5] = -1        # b=1, i=0, j=5 -> byte 21 gets code 0 at bits 0-1
    p = pack_ternary(codes)[0]
    assert p.shape == (32,)
    assert p[3].item() == (1 | (1 << 2) | (2 << 4) | (1 << 6))
    assert p[21].item() == (0 | (1 << 2) | (1 << 4) | (1 << 6))
    assert p[0].item() == 0x55 and p[31].item() == 0x55  # zeros and padding: code 1 everywhere


def test_dequantize():
    codes, scale = ternarize(W)
    w = dequantize_ternary(pack_ternary(codes), scale, 4)
    torch.testing.assert_close(w, codes.float() * scale[:, None])


def test_quantize_activations_by_hand():
    x = torch.tensor([[1.0, -2.0, 0.5, 254.0], [0.0, 0.0, 0.0, 0.0]])
    q, s = quantize_activations(x)
    # s = 254 / 127 = 2 -> x / s = .5 (round half even -> 0), -1, .25, 127
    assert q.dtype == torch.int8 and s.dtype == torch.float32
    assert q.tolist() == [[0, -1, 0, 127], [0, 0, 0, 0]]
    assert s.tolist() == [2.0, 1.0]
    q, s = quantize_activations(x, granularity="tensor")
    assert s.shape == () and q[0].tolist() == [0, -1, 0, 127]
    q, s = quantize_activations(x, bits=4, clip=7.0)  # clamp to 7, qmax 7 -> s = 1
    assert q[0].tolist() == [1, -2, 0, 7] and s[0].item() == 1.0


def test_quantize_activations_error_bound():
    x = torch.randn(5, 3, 100) * 10
    q, s = quantize_activations(x)
    assert q.shape == x.shape and s.shape == (5, 3)
    assert (q.float() * s[..., None] - x).abs().max() <= s.max() / 2 + 1e-6


def test_errors():
    with pytest.raises(ValueError, match="method"):
        ternarize(W, "bogus")
    with pytest.raises(ValueError, match="granularity"):
        ternarize(W, granularity="col")
    with pytest.raises(ValueError, match="2-D"):
        ternarize(W[0])
    with pytest.raises(TypeError, match="weight must have dtype"):
        ternarize(W.long())
    with pytest.raises(ValueError, match="only contain"):
        pack_ternary(torch.tensor([[2, 0]], dtype=torch.int8))
    with pytest.raises(TypeError, match="codes must have dtype"):
        pack_ternary(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="columns"):
        unpack_ternary(torch.zeros(2, 16, dtype=torch.uint8), 65)
    with pytest.raises(TypeError, match="packed must have dtype"):
        unpack_ternary(torch.zeros(2, 16, dtype=torch.int8), 5)
    with pytest.raises(ValueError, match="bits"):
        quantize_activations(torch.ones(2, 2), bits=9)
