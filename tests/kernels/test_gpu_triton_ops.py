"""Triton kernels of the attention and layer-distillation ops on real CUDA
tensors against the float64 reference (tier "cuda": runs where a GPU is).

The interpreter tier (tests/ops) covers the same kernels on CPU tensors at
small shapes; this file checks them compiled, at BERT shapes, on the GPU.
"""
import pytest
import torch

import kdfast
from kdfast.ops import (attention, attention_kl, attention_kl_reference, attention_reference, attention_score_mse,
                        attention_score_mse_reference, hidden_mse, hidden_mse_reference)
from tests.numerics import assert_close_to_oracle

pytestmark = pytest.mark.cuda
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _qkv(B, H, L, D, dtype, seed, n=3, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(B, H, L, D, generator=g, dtype=torch.float64) * scale).to(dtype) for _ in range(n)]


def _mask(B, L):
    mask = torch.ones(B, L, dtype=torch.int64)
    for b in range(B):
        mask[b, max(1, L - 37 * b):] = 0
    return mask


def _run(fn, inputs, grad_idx, backend, device):
    xs = [x.to(device).detach().requires_grad_(i in grad_idx) if x.is_floating_point() else x.to(device)
          for i, x in enumerate(inputs)]
    with kdfast.use_backend(backend):
        out = fn(*xs)
    gout = torch.randn_like(out.float()).to(out.dtype) if out.dim() else torch.tensor(1.7, device=device)
    (out.float() * gout.float()).sum().backward()
    return out.detach().cpu(), [xs[i].grad.cpu() for i in grad_idx], gout.cpu()


def _check(fn, ref_fn, inputs, grad_idx, dtype):
    out, grads, gout = _run(fn, inputs, grad_idx, "triton", "cuda")
    x64 = [x.double().requires_grad_(i in grad_idx) if x.is_floating_point() else x for i, x in enumerate(inputs)]
    o64 = ref_fn(*x64)
    (o64 * gout.double()).sum().backward()
    xd = [x.detach().requires_grad_(i in grad_idx) if x.is_floating_point() else x for i, x in enumerate(inputs)]
    od = ref_fn(*xd)  # same-dtype torch reference
    (od.float() * gout.float()).sum().backward()
    assert_close_to_oracle(out.double().reshape(-1), o64.detach().reshape(-1), od.detach().double().reshape(-1),
                           dtype, what="output")
    for i, g in zip(grad_idx, grads):
        assert_close_to_oracle(g.double(), x64[i].grad, xd[i].grad.double(), dtype, what=f"grad of input {i}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("L,D", [(384, 64), (97, 80)])
def test_attention_triton_on_gpu(dtype, L, D):
    B, H = 4, 12
    q, k, v = _qkv(B, H, L, D, dtype, seed=L)
    mask = _mask(B, L)
    gates = torch.rand(H, dtype=torch.float64).to(dtype) + 0.5
    _check(lambda q, k, v, m, g: attention(q, k, v, mask=m, head_gates=g),
           lambda q, k, v, m, g: attention_reference(q, k, v, mask=m, head_gates=g),
           [q, k, v, mask, gates], (0, 1, 2, 4), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_block_sparse_triton_on_gpu(dtype):
    B, H, L, D, bs = 2, 4, 384, 64, 64
    q, k, v = _qkv(B, H, L, D, dtype, seed=3)
    nb = (L + bs - 1) // bs
    g = torch.Generator().manual_seed(5)
    block_mask = torch.rand(1, H, nb, nb, generator=g) < 0.5
    block_mask[..., torch.arange(nb), torch.arange(nb)] = True  # every query block keeps a key block
    _check(lambda q, k, v, bm: attention(q, k, v, block_mask=bm, block_size=bs),
           lambda q, k, v, bm: attention_reference(q, k, v, block_mask=bm, block_size=bs),
           [q, k, v, block_mask], (0, 1, 2), dtype)


def _varlen_reference(q, k, v, cu, g, L):
    """attention_varlen in plain PyTorch: pad to [B, H, L, D], attention_reference, gather the valid rows."""
    from kdfast.ops.attention import _varlen_index
    b, pos, valid = _varlen_index(cu.long(), L)
    B = cu.numel() - 1

    def pad(x):
        return x.new_zeros((B, L) + tuple(x.shape[1:])).index_put((b, pos), x).transpose(1, 2)
    return attention_reference(pad(q), pad(k), pad(v), mask=valid, head_gates=g).transpose(1, 2)[b, pos]


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_varlen_triton_on_gpu(dtype):
    # Packed [T, H, D] q/k/v, cu_seqlens on the GPU (what kdfast.hf.unpad_encoder runs on CUDA tensors).
    from kdfast.ops.attention import attention_varlen
    lengths, H, D = [384, 201, 97, 1], 12, 64
    T, L = sum(lengths), max(lengths)
    q, k, v = [x[0] for x in _qkv(1, T, H, D, dtype, seed=21)]
    cu = torch.tensor([0] + lengths).cumsum(0)
    gates = (torch.rand(len(lengths), H, dtype=torch.float64) + 0.5).to(dtype)
    _check(lambda q, k, v, cu, g: attention_varlen(q, k, v, cu, cu, L, L, head_gates=g),
           lambda q, k, v, cu, g: _varlen_reference(q, k, v, cu, g, L),
           [q, k, v, cu, gates], (0, 1, 2, 4), dtype)


@pytest.mark.parametrize("op,ref", [(attention_kl, attention_kl_reference),
                                    (attention_score_mse, attention_score_mse_reference)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_map_losses_triton_on_gpu(op, ref, dtype):
    B, H, L = 4, 12, 384
    q_s, k_s = _qkv(B, H, L, 32, dtype, seed=7, n=2)
    q_t, k_t = _qkv(B, H, L, 64, dtype, seed=8, n=2)
    _check(lambda a, b, c, d, m: op(a, b, c, d, m), lambda a, b, c, d, m: ref(a, b, c, d, m),
           [q_s, k_s, q_t, k_t, _mask(B, L)], (0, 1), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_hidden_mse_triton_on_gpu(dtype):
    g = torch.Generator().manual_seed(11)
    hs = torch.randn(4, 384, 312, generator=g, dtype=torch.float64).to(dtype)
    ht = torch.randn(4, 384, 768, generator=g, dtype=torch.float64).to(dtype)
    w = (torch.randn(768, 312, generator=g, dtype=torch.float64) / 312 ** 0.5).to(dtype)
    b = torch.randn(768, generator=g, dtype=torch.float64).to(dtype)
    _check(lambda hs, ht, w, b, m: hidden_mse(hs, ht, w, b, m),
           lambda hs, ht, w, b, m: hidden_mse_reference(hs, ht, w, b, m),
           [hs, ht, w, b, _mask(4, 384)], (0, 2, 3), dtype)
