"""What the attention-map losses (attention_kl, attention_score_mse) share: the checks of their
q/k/mask arguments and the kernels' limits, the valid (query, key) pair mask, the fake impl of their forward op and the
reference backends' gradient weighting. Their autograd is kdfast/ops/loss_grad_autograd.py."""
from __future__ import annotations

import math

import torch

from kdfast import backends
from kdfast.ops import _checks
from kdfast.ops.loss_grad_autograd import grad_dtype

# What the cpu and triton kernels of both ops take (kdfast.backends checks it; explain() reports it).
KERNEL_LIMITS = backends.Limits(dtypes=backends.kernel_dtypes("q_s", "k_s", "q_t", "k_t"))


def check(q_s, k_s, q_t, k_t, mask, scale_s, scale_t, op):
    """Validate [B, H, L, D] student/teacher q and k and the [B, L] mask.

    Returns (mask as contiguous float32 [B, L] with 1 = keep, scale_s, scale_t).
    """
    for name, x in (("q_s", q_s), ("k_s", k_s), ("q_t", q_t), ("k_t", k_t)):
        _checks.tensor(name, x, dtypes=_checks.FLOAT_DTYPES, ndim=4)
    _checks.same_device(q_s=q_s, k_s=k_s, q_t=q_t, k_t=k_t, mask=mask)
    if k_s.shape != q_s.shape:
        raise ValueError(f"{op}: k_s must have the shape of q_s {tuple(q_s.shape)}, got {tuple(k_s.shape)}")
    if k_t.shape != q_t.shape:
        raise ValueError(f"{op}: k_t must have the shape of q_t {tuple(q_t.shape)}, got {tuple(k_t.shape)}")
    B, H, L, Ds = q_s.shape
    if q_t.shape[1] != H:
        raise ValueError(f"{op}: student and teacher must have the same number of heads, got q_s with {H} and "
                         f"q_t with {q_t.shape[1]} (map heads first, e.g. average teacher heads); head dims may "
                         "differ")
    if q_t.shape[0] != B or q_t.shape[2] != L:
        raise ValueError(f"{op}: q_t must be [B={B}, H={H}, L={L}, D_t], got {tuple(q_t.shape)}")
    if Ds == 0 or q_t.shape[3] == 0:
        raise ValueError(f"{op}: head dims must be >= 1, got {Ds} (student) and {q_t.shape[3]} (teacher)")
    if mask is None:
        m = torch.ones(B, L, dtype=torch.float32, device=q_s.device)
    else:
        _checks.tensor("mask", mask, ndim=2)
        if tuple(mask.shape) != (B, L):
            raise ValueError(f"mask must be [B={B}, L={L}] (1 = keep), got {tuple(mask.shape)}")
        m = (mask != 0).to(torch.float32).contiguous()
    scale_s = 1.0 / math.sqrt(Ds) if scale_s is None else _checks.positive("scale_s", scale_s)
    scale_t = 1.0 / math.sqrt(q_t.shape[3]) if scale_t is None else _checks.positive("scale_t", scale_t)
    return m, float(scale_s), float(scale_t)


def pair_mask(mask: torch.Tensor) -> torch.Tensor:
    """[B, 1, L, L] bool: query i and key j both kept."""
    keep = mask != 0
    return keep[:, None, :, None] & keep[:, None, None, :]


def fake_pair_loss(q_s, k_s, q_t, k_t, mask, scale_s, scale_t, compute_grad, grad_weight, backend):
    """Fake impl shared by the attention-map loss ops: per-(b, h) loss and two gradients."""
    B, H, L, D = q_s.shape
    loss = q_s.new_empty((B, H), dtype=torch.float32)
    if not compute_grad:
        return loss, q_s.new_empty((0,), dtype=torch.float32), q_s.new_empty((0,), dtype=torch.float32)
    return (loss, q_s.new_empty((B, H, L, D), dtype=grad_dtype(q_s, grad_weight)),
            k_s.new_empty((B, H, L, D), dtype=grad_dtype(k_s, grad_weight)))


def weighted(dq, dk, q_s, k_s, grad_weight):
    """Reference backends: unit gradients times grad_weight[b, h], in the inputs' dtypes."""
    if grad_weight is None:
        return dq.float(), dk.float()
    w = grad_weight.to(dq.dtype)[:, :, None, None]
    return (w * dq).to(q_s.dtype), (w * dk).to(k_s.dtype)
