"""Pruned attention: padding-aware (variable length), head-gated, head-pruned
and block-sparse scaled dot-product attention with forward and backward.

Backends (dispatch names: forward "attention", backward "attention_bwd"; varlen "attention_varlen" /
"attention_varlen_bwd"; ``kdfast.explain("attention", q, k, v, ...)`` says which forward runs):

    cpu:       csrc/cpu/attention_train.cpp (fwd, bwd; varlen too); with a block mask the fwd is
               csrc/cpu/attention.cpp and the bwd is this file's reference backward, a few examples at a time
    triton:    kdfast/kernels/triton/attention.py (fwd, bwd; varlen too: the same kernels on packed rows)
    cuda:      none (Triton on GPU)
    reference: this file (fwd, bwd)

    out = attention(q, k, v, mask=pad, head_gates=g, active_heads=a,
                    block_mask=bm, block_size=64)

Meaning (the reference below is the specification):

- ``q`` ``[B, H, Lq, D]``, ``k``/``v`` ``[B, H, Lk, D]`` (float32/bfloat16/
  float16/float64; any strides with a unit last dimension).
- ``mask`` ``[B, Lk]`` (bool or integer, 1 = keep): padded keys get no
  weight. Kernels never look at them (variable-length processing).
- ``head_gates`` ``[H]`` or ``[B, H]`` float: head h's output is multiplied
  by its gate, fused into the output write (L0 gates during pruning).
  Differentiable.
- ``active_heads`` ``[H]`` bool, or int64 head indices: only these heads are
  computed; the others output 0 and cost nothing.
- ``block_mask`` ``[B or 1, H or 1, ceil(Lq/bs), ceil(Lk/bs)]`` bool with
  ``block_size=bs``: query block i attends to key block j only where true;
  false blocks are skipped.
- A query row with no key left (all masked) outputs 0 (SDPA gives NaN).
- ``zero_padded_queries=True`` (self-attention, Lq == Lk): rows at padded
  positions output 0 and are not computed (what FlashAttention varlen does);
  by default they are computed over the valid keys like SDPA with a padding
  mask, so outputs equal SDPA's everywhere.
- ``dropout_p > 0`` (training with attention dropout): the CPU kernel drops
  attention probabilities with a counter-based RNG (Philox-4x32-10, the
  numbers of Triton's ``tl.rand``) keyed by (seed, offset, b, h, i, j); seed
  and offset are drawn from torch's default generator per call
  (``torch.manual_seed`` reproduces a run), and the backward regenerates the
  mask instead of storing it. :func:`attention_dropout_mask` returns that mask
  and ``attention_reference(..., dropout_mask=)`` takes it. With a block mask
  the reference runs on the CPU (same mask); the Triton kernels draw the same
  numbers with ``tl.rand`` (GPU tensors without Triton run SDPA's dropout).

Equivalent PyTorch (no gates, no block mask)::

    F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :].bool(), scale=scale)

Kernels return the log-sum-exp of each row (float32 ``[B, H, Lq]``) for the
backward pass, which recomputes probabilities block by block.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kdfast import backends
from kdfast.ops import _checks

DEFAULT_BLOCK_SIZE = 64


# --------------------------------------------------------------------------
# Reference: the specification every backend is tested against.
# --------------------------------------------------------------------------
def allowed_pairs(B, H, Lq, Lk, mask, active, block_mask, block_size, zero_padded_queries, device):
    """Boolean [B, H, Lq, Lk]: which (query, key) pairs take part."""
    allow = torch.ones(B, H, Lq, Lk, dtype=torch.bool, device=device)
    if mask is not None:
        allow = allow & mask.bool()[:, None, None, :]
        if zero_padded_queries:
            allow = allow & mask.bool()[:, None, :, None]
    if active is not None:
        allow = allow & active.bool()[None, :, None, None]
    if block_mask is not None:
        bm = block_mask.bool().repeat_interleave(block_size, -2).repeat_interleave(block_size, -1)
        allow = allow & bm[..., :Lq, :Lk]
    return allow


def attention_reference(q, k, v, *, mask=None, head_gates=None, active_heads=None, block_mask=None,
                        block_size=DEFAULT_BLOCK_SIZE, scale=None, dropout_p=0.0, zero_padded_queries=False,
                        return_lse=False, dropout_mask=None):
    """Readable reference (differentiable through plain PyTorch); also the float64 oracle.

    Materialises the [B, H, Lq, Lk] scores. ``dropout_mask`` (bool ``[B, H, Lq, Lk]``, True = kept)
    applies that dropout mask (kept probabilities scaled by ``1 / (1 - dropout_p)``) instead of
    drawing one with ``F.dropout``. Returns out ``[B, H, Lq, D]`` in
    q's dtype (computed in float32, or float64 for float64 inputs) and, with
    ``return_lse``, the row log-sum-exp (-inf for empty rows).
    """
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    active = _active_mask(active_heads, H, q.device)
    allow = allowed_pairs(B, H, Lq, Lk, mask, active, block_mask, block_size, zero_padded_queries, q.device)
    s = torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2)) * scale
    s = s.masked_fill(~allow, float("-inf"))
    live = allow.any(-1, keepdim=True)
    lse = torch.logsumexp(torch.where(live, s, torch.zeros_like(s)), -1, keepdim=True)
    p = torch.where(allow, torch.exp(s - torch.where(live, lse, torch.zeros_like(lse))), torch.zeros_like(s))
    if dropout_p > 0 and dropout_mask is not None:  # the kernels' mask (attention_dropout_mask), kept = True
        p = torch.where(dropout_mask.bool(), p / (1.0 - dropout_p), torch.zeros_like(p))
    elif dropout_p > 0:
        p = F.dropout(p, dropout_p)
    out = torch.matmul(p, v.to(acc))
    if head_gates is not None:
        g = head_gates.to(acc)
        g = g[None, :] if g.dim() == 1 else g
        out = out * g[:, :, None, None]
    out = out.to(q.dtype)
    if return_lse:
        return out, torch.where(live, lse, torch.full_like(lse, float("-inf"))).squeeze(-1).float()
    return out


def _active_mask(active_heads, H, device):
    if active_heads is None:
        return None
    if active_heads.dtype == torch.bool:
        return active_heads
    return torch.zeros(H, dtype=torch.bool, device=device).index_fill(0, active_heads.long(), True)


# --------------------------------------------------------------------------
# Custom ops: forward (out, lse, ungated out) and backward.
# --------------------------------------------------------------------------
@torch.library.custom_op("kdfast::attention_fwd", mutates_args=())
def _attn_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
              head_gates: torch.Tensor | None, active: torch.Tensor | None, block_mask: torch.Tensor | None,
              block_size: int, scale: float, zero_padded_queries: bool, keep_ungated: bool,
              dropout_p: float, rng: torch.Tensor | None,
              backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return backends.run("attention", q, k, v, mask, head_gates, active, block_mask, block_size, scale,
                        zero_padded_queries, keep_ungated, dropout_p, rng, backend=backend or None)


def _out_like(q, v):
    """Output [B, H, Lq, Dv] stored as [B, Lq, H, Dv] (what HF wants after transpose(1, 2))."""
    B, H, Lq, _ = q.shape
    return q.new_empty((B, Lq, H, v.shape[-1])).transpose(1, 2)


@_attn_fwd.register_fake
def _(q, k, v, mask, head_gates, active, block_mask, block_size, scale, zero_padded_queries, keep_ungated,
      dropout_p, rng, backend):
    B, H, Lq, _ = q.shape
    ung = _out_like(q, v) if keep_ungated else q.new_empty((0,))
    return _out_like(q, v), q.new_empty((B, H, Lq), dtype=torch.float32), ung


@torch.library.custom_op("kdfast::attention_bwd", mutates_args=())
def _attn_bwd(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
              ungated: torch.Tensor, lse: torch.Tensor, mask: torch.Tensor | None, head_gates: torch.Tensor | None,
              active: torch.Tensor | None, block_mask: torch.Tensor | None, block_size: int, scale: float,
              zero_padded_queries: bool, dropout_p: float, rng: torch.Tensor | None, backend: str
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return backends.run("attention_bwd", grad_out, q, k, v, out, ungated, lse, mask, head_gates, active,
                        block_mask, block_size, scale, zero_padded_queries, dropout_p, rng,
                        backend=backend or None)


@_attn_bwd.register_fake
def _(grad_out, q, k, v, out, ungated, lse, mask, head_gates, active, block_mask, block_size, scale,
      zero_padded_queries, dropout_p, rng, backend):
    dg = torch.empty_like(head_gates, dtype=torch.float32) if head_gates is not None else q.new_empty((0,))
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dg


def _setup_context(ctx, inputs, output):
    q, k, v, mask, gates, active, bm, bs, scale, zpq, keep_ungated, dropout_p, rng, backend = inputs
    out, lse, ung = output
    ctx.save_for_backward(q, k, v, out, ung, lse, mask, gates, active, bm, rng)
    ctx.args = (bs, scale, zpq, dropout_p, backend)


def _backward(ctx, grad_out, _g_lse, _g_ung):
    q, k, v, out, ung, lse, mask, gates, active, bm, rng = ctx.saved_tensors
    bs, scale, zpq, dropout_p, backend = ctx.args
    dq, dk, dv, dg = _attn_bwd(grad_out, q, k, v, out, ung, lse, mask, gates, active, bm, bs, scale, zpq,
                               dropout_p, rng, backend)
    dgates = dg.to(gates.dtype) if (gates is not None and ctx.needs_input_grad[4]) else None
    return dq, dk, dv, None, dgates, None, None, None, None, None, None, None, None, None


_attn_fwd.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------
# Dropout mask: Philox-4x32-10 as Triton's tl.rand(seed, offset), element
# (b, h, i, j) at counter offset + ((b * H + h) * Lq + i) * Lk + j; kept when
# u >= p. The CPU kernel draws the same numbers inside its loops.
# --------------------------------------------------------------------------
_M32 = 0xFFFFFFFF


def _philox_uniform(seed: int, ctr: torch.Tensor) -> torch.Tensor:
    """float32 uniforms of Philox-4x32-10 (Triton's tl.rand) for int64 counters (wrapping as uint64)."""
    c0, c1 = ctr & _M32, (ctr >> 32) & _M32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    seed &= (1 << 64) - 1
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    for _ in range(10):
        pa, pb = 0xD2511F53 * c0, 0xCD9E8D57 * c2  # int64 products wrap: the low 64 bits are exact
        c0, c2, c1, c3 = ((pb >> 32) & _M32) ^ c1 ^ k0, ((pa >> 32) & _M32) ^ c3 ^ k1, pb & _M32, pa & _M32
        k0, k1 = (k0 + 0x9E3779B9) & _M32, (k1 + 0xBB67AE85) & _M32
    x = torch.where(c0 >= (1 << 31), c0 - (1 << 32), c0)
    x = torch.where(x < 0, -x - 1, x)
    return x.to(torch.float32) * torch.tensor(4.6566127342e-10, dtype=torch.float32)


def dropout_keep_reference(rng, B, H, Lq, Lk, p):
    """The kernels' keep mask (bool ``[B, H, Lq, Lk]``) in plain PyTorch (the specification)."""
    seed, offset = (int(x) for x in rng.cpu().tolist())
    ctr = torch.arange(B * H * Lq * Lk, dtype=torch.int64) + offset
    u = _philox_uniform(seed, ctr).view(B, H, Lq, Lk)
    return (u >= torch.tensor(p, dtype=torch.float32)).to(rng.device)


def attention_dropout_mask(rng, B, H, Lq, Lk, p):
    """The dropout keep mask (bool ``[B, H, Lq, Lk]``, True = kept) the kernels use for ``rng``
    (int64 ``[seed, offset]``, see :func:`draw_dropout_rng`) and rate ``p``: pass it to
    ``attention_reference(..., dropout_p=p, dropout_mask=...)`` to reproduce a kernel's output.
    Packed (varlen) input uses Lq/Lk = max_seqlen_q/k and sequence-local positions."""
    if rng.device.type == "cpu" and hasattr(getattr(torch.ops, "kdfast_C", None), "attention_dropout_mask"):
        try:
            return torch.ops.kdfast_C.attention_dropout_mask(rng, B, H, Lq, Lk, float(p))
        except (AttributeError, RuntimeError):
            pass
    return dropout_keep_reference(rng, B, H, Lq, Lk, p)


def draw_dropout_rng(device=None) -> torch.Tensor:
    """int64 ``[seed, offset]`` drawn from torch's default generator (``torch.manual_seed`` reproduces it)."""
    return torch.randint(0, 1 << 62, (2,), dtype=torch.int64, device=device)


def _keep(rng, q, k, p):
    B, H, Lq, _ = q.shape
    return attention_dropout_mask(rng, B, H, Lq, k.shape[2], p).to(q.device)


@backends.register("attention", "reference")
def _fwd_reference(q, k, v, mask, gates, active, bm, bs, scale, zpq, keep_ungated, dropout_p=0.0, rng=None):
    keep = _keep(rng, q, k, dropout_p) if dropout_p > 0 else None
    o, lse = attention_reference(q, k, v, mask=mask, active_heads=active, block_mask=bm, block_size=bs,
                                 scale=scale, zero_padded_queries=zpq, return_lse=True, dropout_p=dropout_p,
                                 dropout_mask=keep)
    out = _out_like(q, v)
    if gates is not None:
        g = gates if gates.dim() == 2 else gates[None, :]
        out.copy_((o.float() * g.float()[:, :, None, None]).to(q.dtype))
    else:
        out.copy_(o)
    ung = q.new_empty((0,))
    if keep_ungated:
        ung = _out_like(q, v)
        ung.copy_(o)
    return out, lse, ung


@backends.register("attention_bwd", "reference")
def _bwd_reference(grad_out, q, k, v, out, ung, lse, mask, gates, active, bm, bs, scale, zpq, dropout_p=0.0,
                   rng=None):
    """Gradients written out from the saved row log-sum-exp (probabilities recomputed).

    With P = exp(S - lse) on allowed pairs, Z the dropout mask (0 or 1/(1-p)), g the gate:
      dO = g * grad_out,  dV = (P Z)^T dO,  dP = Z (dO V^T),  dS = P * (dP - rowsum(P * dP)),
      dQ = scale * dS K,  dK = scale * dS^T Q,  d g = sum(grad_out * O) (O ungated).
    """
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    act = _active_mask(active, H, q.device)
    allow = allowed_pairs(B, H, Lq, Lk, mask, act, bm, bs, zpq, q.device)
    qf, kf, vf = q.to(acc), k.to(acc), v.to(acc)
    s = torch.matmul(qf, kf.transpose(-1, -2)) * scale
    lse_a = lse.to(acc)[..., None]
    live = torch.isfinite(lse_a)
    p = torch.where(allow & live, torch.exp(s - torch.where(live, lse_a, torch.zeros_like(lse_a))),
                    torch.zeros_like(s))
    z = None
    if dropout_p > 0:
        z = _keep(rng, q, k, dropout_p).to(acc) / (1.0 - dropout_p)
    pd = p if z is None else p * z
    go = grad_out.to(acc)
    dg = q.new_empty((0,))
    if gates is not None:
        g = (gates if gates.dim() == 2 else gates[None, :]).to(acc)
        o = ung.to(acc) if ung.numel() else torch.matmul(pd, vf)
        dgf = (go * o).sum((-1, -2))  # [B, H]
        dg = (dgf if gates.dim() == 2 else dgf.sum(0)).float()
        go = go * g[:, :, None, None]
    dv = torch.matmul(pd.transpose(-1, -2), go)
    dp = torch.matmul(go, vf.transpose(-1, -2))
    if z is not None:
        dp = dp * z
    d = (p * dp).sum(-1, keepdim=True)
    ds = p * (dp - d)
    dq = torch.matmul(ds, kf) * scale
    dk = torch.matmul(ds.transpose(-1, -2), qf) * scale
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dg


# What the cpu and triton kernels take (kdfast.backends checks it; explain() reports it): head dims up
# to 256, one head dim for q, k and v. The varlen entry points check q only (k and v match it).
KERNEL_LIMITS = backends.Limits(dtypes=backends.kernel_dtypes("q", "k", "v"),
                                max_size={("q", -1): 256, ("v", -1): 256}, same_size=((("q", -1), ("v", -1)),))
VARLEN_KERNEL_LIMITS = backends.Limits(dtypes=backends.kernel_dtypes("q"), max_size={("q", -1): 256})


def _cpu_fwd_check(q, k, v, mask, gates, active, bm, bs, scale=None, zpq=False, keep_ungated=False, dropout_p=0.0,
                   rng=None):
    if dropout_p > 0 and bm is not None:
        return "dropout with a block mask is not in the CPU kernels"
    return None


def _cpu_bwd_check(grad_out, q, k, v, out, ung, lse, mask, gates, active, bm, bs, scale, zpq, dropout_p=0.0,
                   rng=None):
    return _cpu_fwd_check(q, k, v, mask, gates, active, bm, bs, scale, zpq, False, dropout_p, rng)


@backends.register("attention", "cpu", check=_cpu_fwd_check, kernel="attention_train_fwd", limits=KERNEL_LIMITS)
def _fwd_cpu(q, k, v, mask, gates, active, bm, bs, scale, zpq, keep_ungated, dropout_p=0.0, rng=None):
    if bm is not None:  # block-sparse: the broadcast-FMA kernel of attention.cpp skips masked blocks
        return torch.ops.kdfast_C.attention_fwd(q, k, v, mask, gates, active, bm, bs, scale, zpq, keep_ungated)
    return torch.ops.kdfast_C.attention_train_fwd(q, k, v, mask, None, None, 0, 0, gates, active, scale, zpq,
                                                  keep_ungated, float(dropout_p), rng)


# The block-sparse CPU backward recomputes probabilities with ATen matmuls (the reference
# backward), a few examples at a time: its [b, H, Lq, Lk] maps (scores,
# probabilities, their gradient and the masks, ~6 live at once) stay near
# CPU_BWD_CHUNK_BYTES each instead of B times one example's (B=8, L=384, H=12:
# one map is 57 MB, a chunk of 2 examples 14 MB). Without a block mask the
# compiled flash-style backward (attention_train.cpp) runs instead: one m x n tile per thread.
CPU_BWD_CHUNK_BYTES = 16 << 20


@backends.register("attention_bwd", "cpu", check=_cpu_bwd_check, kernel="attention_train_fwd", limits=KERNEL_LIMITS)
def _bwd_cpu(grad_out, q, k, v, out, ung, lse, mask, gates, active, bm, bs, scale, zpq, dropout_p=0.0, rng=None):
    if bm is None:
        return torch.ops.kdfast_C.attention_train_bwd(
            grad_out, q, k, v, ung, lse, mask, None, None, 0, 0, gates, active, scale, zpq, float(dropout_p), rng,
            gates is not None and ung.numel() > 0)
    B, H, Lq, _ = q.shape
    per = max(1, CPU_BWD_CHUNK_BYTES // max(1, H * Lq * k.shape[2] * 4))
    if per >= B:
        return _bwd_reference(grad_out, q, k, v, out, ung, lse, mask, gates, active, bm, bs, scale, zpq)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    per_example_gates = gates is not None and gates.dim() == 2
    dg = q.new_empty((0,))
    if gates is not None:
        dg = torch.zeros(gates.shape, dtype=torch.float32, device=q.device)
    for b0 in range(0, B, per):
        sl = slice(b0, min(B, b0 + per))

        def cut(x, batched=True):  # the examples of this chunk; per-batch tensors only
            return x[sl] if x is not None and batched and x.numel() else x

        dq_c, dk_c, dv_c, dg_c = _bwd_reference(
            grad_out[sl], q[sl], k[sl], v[sl], out[sl], cut(ung), lse[sl], cut(mask), cut(gates, per_example_gates),
            active, cut(bm, bm is not None and bm.shape[0] == B > 1), bs, scale, zpq)
        dq[sl], dk[sl], dv[sl] = dq_c, dk_c, dv_c
        if per_example_gates:
            dg[sl] = dg_c
        elif gates is not None:
            dg += dg_c
    return dq, dk, dv, dg


def _triton_check(q, k, v, mask, gates, active, bm, bs, scale=None, zpq=False, keep_ungated=False, dropout_p=0.0,
                  rng=None):
    if bm is not None:
        from kdfast.kernels.triton.attention import block_size_ok
        if not block_size_ok(bs):
            return f"block_size {bs} is not a Triton tile size (16, 32, 64 or 128)"
    return None


def _triton_bwd_check(grad_out, q, k, v, out, ung, lse, mask, gates, active, bm, bs, scale=None, zpq=False,
                      dropout_p=0.0, rng=None):
    return _triton_check(q, k, v, mask, gates, active, bm, bs, dropout_p=dropout_p)


@backends.register("attention", "triton", check=_triton_check, limits=KERNEL_LIMITS)
def _fwd_triton(q, k, v, mask, gates, active, bm, bs, scale, zpq, keep_ungated, dropout_p=0.0, rng=None):
    from kdfast.kernels.triton import attention as kt
    return kt.attention_fwd(q, k, v, mask, gates, active, bm, bs, scale, zpq, keep_ungated, dropout_p, rng)


@backends.register("attention_bwd", "triton", check=_triton_bwd_check, limits=KERNEL_LIMITS)
def _bwd_triton(grad_out, q, k, v, out, ung, lse, mask, gates, active, bm, bs, scale, zpq, dropout_p=0.0, rng=None):
    from kdfast.kernels.triton import attention as kt
    return kt.attention_bwd(grad_out, q, k, v, out, ung, lse, mask, gates, active, bm, bs, scale, zpq, dropout_p,
                            rng)


backends.set_gpu_order("attention", ("triton",))
backends.set_gpu_order("attention_bwd", ("triton",))


# --------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------
def _check_inputs(q, k, v, mask, head_gates, active_heads, block_mask, block_size, scale, dropout_p):
    _checks.tensor("q", q, dtypes=_checks.FLOAT_DTYPES, ndim=4)
    _checks.tensor("k", k, dtypes=(q.dtype,), ndim=4)
    _checks.tensor("v", v, dtypes=(q.dtype,), ndim=4)
    B, H, Lq, D = q.shape
    if k.shape[:2] != (B, H) or k.shape[3] != D:
        raise ValueError(f"k must be [B={B}, H={H}, Lk, D={D}] like q, got {tuple(k.shape)}")
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"v must be [B, H, Lk, Dv] with B, H, Lk of k {tuple(k.shape[:3])}, got {tuple(v.shape)}")
    Lk = k.shape[2]
    _checks.same_device(q=q, k=k, v=v, mask=mask, head_gates=head_gates, active_heads=active_heads,
                        block_mask=block_mask)
    if mask is not None:
        _checks.tensor("mask", mask, ndim=2)
        if mask.dtype.is_floating_point or tuple(mask.shape) != (B, Lk):
            raise ValueError(f"mask must be a bool/integer [B={B}, Lk={Lk}] padding mask (1 = keep), "
                             f"got {mask.dtype} {tuple(mask.shape)}")
    if head_gates is not None:
        _checks.tensor("head_gates", head_gates, dtypes=_checks.FLOAT_DTYPES)
        if tuple(head_gates.shape) not in ((H,), (B, H)):
            raise ValueError(f"head_gates must be [H={H}] or [B={B}, H={H}], got {tuple(head_gates.shape)}")
    if active_heads is not None:
        _checks.tensor("active_heads", active_heads, dtypes=(torch.bool, torch.int64, torch.int32), ndim=1)
        if active_heads.dtype == torch.bool and active_heads.shape[0] != H:
            raise ValueError(f"active_heads as a bool mask must be [H={H}], got {tuple(active_heads.shape)}")
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    if block_mask is not None:
        _checks.tensor("block_mask", block_mask, dtypes=(torch.bool,), ndim=4)
        nq, nk = -(-Lq // block_size), -(-Lk // block_size)
        bb, bh = block_mask.shape[:2]
        if bb not in (1, B) or bh not in (1, H) or tuple(block_mask.shape[2:]) != (nq, nk):
            raise ValueError(f"block_mask must be [1 or B={B}, 1 or H={H}, {nq}, {nk}] for block_size="
                             f"{block_size}, got {tuple(block_mask.shape)}")
    if scale is not None and not (isinstance(scale, (int, float)) and scale > 0):
        raise ValueError(f"scale must be a positive number or None, got {scale!r}")
    if not (isinstance(dropout_p, (int, float)) and 0.0 <= dropout_p < 1.0):
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")


def _attention_dropout(q, k, v, mask, head_gates, active_heads, scale, dropout_p, zero_padded_queries):
    """``dropout_p > 0`` without a block mask: PyTorch SDPA draws the dropout mask (its fused
    kernels take the padding mask too, so no L x L map on CUDA), then kdfast's extras: head
    gates, inactive heads and key-less rows give 0, padded queries give 0 when asked.
    """
    B, H = q.shape[:2]
    heads = None
    if active_heads is not None:
        heads = _active_mask(active_heads, H, q.device).nonzero().flatten()
        q, k, v = q[:, heads], k[:, heads], v[:, heads]
    attn_mask = live = None
    if mask is not None:
        keep = mask != 0
        live = keep.any(-1)
        # An example with no key attends everywhere here (finite values and gradients, unlike an
        # all-False SDPA row) and is zeroed below.
        attn_mask = (keep | ~live[:, None])[:, None, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale)
    if mask is not None:
        rows = live[:, None] & keep if zero_padded_queries else live[:, None].expand(B, q.shape[2])
        out = out * rows[:, None, :, None].to(out.dtype)
    if head_gates is not None:
        g = head_gates if head_gates.dim() == 2 else head_gates[None, :]
        g = g if heads is None else g[:, heads]
        out = out * g[:, :, None, None].to(out.dtype)
    if heads is not None:
        full = out.new_zeros(B, H, *out.shape[2:])
        out = full.index_copy(1, heads, out)
    return out


def attention(q, k, v, *, mask=None, head_gates=None, active_heads=None, block_mask=None,
              block_size=DEFAULT_BLOCK_SIZE, scale=None, dropout_p=0.0, zero_padded_queries=False):
    """Scaled dot-product attention with padding, head gates, head pruning and block sparsity.

    Args (see the module docstring for the full meaning):
        q: ``[B, H, Lq, D]``; k, v: ``[B, H, Lk, D]``, same dtype.
        mask: ``[B, Lk]`` bool/int padding mask, 1 = keep.
        head_gates: ``[H]`` or ``[B, H]`` per-head output multipliers (differentiable).
        active_heads: ``[H]`` bool or int64 indices of the heads to compute; the others give 0.
        block_mask: ``[1|B, 1|H, ceil(Lq/block_size), ceil(Lk/block_size)]`` bool.
        scale: defaults to ``1/sqrt(D)``.
        dropout_p: attention-probability dropout, in the kernel (see the module docstring).
        zero_padded_queries: padded query rows output 0 instead of attending.

    Returns ``[B, H, Lq, D]`` in q's dtype (stored as ``[B, Lq, H, D]``, so
    ``out.transpose(1, 2)`` is contiguous). Gradients flow to q, k, v and head_gates.

    Equivalent PyTorch: ``F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None].bool(),
    scale=scale) * head_gates[:, None, None]``.
    """
    _check_inputs(q, k, v, mask, head_gates, active_heads, block_mask, block_size, scale, dropout_p)
    if zero_padded_queries and mask is not None and q.shape[2] != k.shape[2]:
        raise ValueError("zero_padded_queries needs self-attention (Lq == Lk) so that mask also marks queries")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    dropout_p = float(dropout_p)
    if dropout_p > 0 and block_mask is None and q.device.type != "cpu" and backends.triton_available() is not None:
        # Without Triton no GPU kernel draws dropout masks: SDPA (fused, padding mask included).
        return _attention_dropout(q, k, v, mask, head_gates, active_heads, scale, dropout_p, zero_padded_queries)
    active = _active_mask(active_heads, q.shape[1], q.device) if active_heads is not None else None
    if mask is not None and mask.dtype != torch.bool:
        mask = mask != 0
    # Seed and offset of the kernels' counter-based dropout RNG, from torch's generator.
    rng = draw_dropout_rng(q.device) if dropout_p > 0 else None
    keep_ungated = head_gates is not None and head_gates.requires_grad and torch.is_grad_enabled()
    # Eager: choose here so forward and backward surely use one backend. Under
    # torch.compile the op body chooses at run time (same rules, opaque to the tracer).
    backend = "" if torch.compiler.is_compiling() else backends.explain(
        "attention", q, k, v, mask, head_gates, active, block_mask, block_size, scale, zero_padded_queries,
        keep_ungated, dropout_p, rng).backend
    out, _, _ = _attn_fwd(q, k, v, mask, head_gates, active, block_mask, block_size, scale,
                          bool(zero_padded_queries), keep_ungated, dropout_p, rng, backend)
    return out


# --------------------------------------------------------------------------
# Packed variable-length input (FlashAttention's varlen layout)
# --------------------------------------------------------------------------
@torch.library.custom_op("kdfast::attention_varlen_fwd", mutates_args=())
def _varlen_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
                max_q: int, max_k: int, head_gates: torch.Tensor | None, active: torch.Tensor | None, scale: float,
                keep_ungated: bool, dropout_p: float, rng: torch.Tensor | None,
                backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return backends.run("attention_varlen", q, k, v, cu_q, cu_k, max_q, max_k, head_gates, active, scale,
                        keep_ungated, dropout_p, rng, backend=backend or None)


@_varlen_fwd.register_fake
def _(q, k, v, cu_q, cu_k, max_q, max_k, head_gates, active, scale, keep_ungated, dropout_p, rng, backend):
    T, H, _ = q.shape
    ung = q.new_empty((T, H, v.shape[-1])) if keep_ungated else q.new_empty((0,))
    return q.new_empty((T, H, v.shape[-1])), q.new_empty((H, T), dtype=torch.float32), ung


@torch.library.custom_op("kdfast::attention_varlen_bwd", mutates_args=())
def _varlen_bwd(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                ung: torch.Tensor, lse: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor, max_q: int, max_k: int,
                head_gates: torch.Tensor | None, active: torch.Tensor | None, scale: float, dropout_p: float,
                rng: torch.Tensor | None, backend: str
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return backends.run("attention_varlen_bwd", grad_out, q, k, v, out, ung, lse, cu_q, cu_k, max_q, max_k,
                        head_gates, active, scale, dropout_p, rng, backend=backend or None)


@_varlen_bwd.register_fake
def _(grad_out, q, k, v, out, ung, lse, cu_q, cu_k, max_q, max_k, head_gates, active, scale, dropout_p, rng,
      backend):
    dg = torch.empty_like(head_gates, dtype=torch.float32) if head_gates is not None else q.new_empty((0,))
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dg


def _varlen_setup(ctx, inputs, output):
    q, k, v, cu_q, cu_k, max_q, max_k, gates, active, scale, keep_ungated, dropout_p, rng, backend = inputs
    out, lse, ung = output  # out: the Triton backward's rowsum(grad_out * out) (the CPU one recomputes it)
    ctx.save_for_backward(q, k, v, out, ung, lse, cu_q, cu_k, gates, active, rng)
    ctx.args = (max_q, max_k, scale, dropout_p, backend)


def _varlen_backward(ctx, grad_out, _g_lse, _g_ung):
    q, k, v, out, ung, lse, cu_q, cu_k, gates, active, rng = ctx.saved_tensors
    max_q, max_k, scale, dropout_p, backend = ctx.args
    dq, dk, dv, dg = _varlen_bwd(grad_out, q, k, v, out, ung, lse, cu_q, cu_k, max_q, max_k, gates, active, scale,
                                 dropout_p, rng, backend)
    dgates = dg.to(gates.dtype) if (gates is not None and ctx.needs_input_grad[7]) else None
    return dq, dk, dv, None, None, None, None, dgates, None, None, None, None, None, None


_varlen_fwd.register_autograd(_varlen_backward, setup_context=_varlen_setup)


def _varlen_index(cu, L):
    """(batch, position) of every packed token, and the [B, L] validity mask."""
    lengths = cu[1:] - cu[:-1]
    B = lengths.numel()
    b = torch.repeat_interleave(torch.arange(B, device=cu.device), lengths)
    pos = torch.arange(b.numel(), device=cu.device) - cu[:-1].repeat_interleave(lengths)
    valid = torch.arange(L, device=cu.device)[None, :] < lengths[:, None]
    return b, pos, valid


def _pad_packed(x, b, pos, B, L, fill=0.0):
    """[T, H, D] -> [B, H, L, D]."""
    out = x.new_full((B, L) + tuple(x.shape[1:]), fill)
    out[b, pos] = x
    return out.transpose(1, 2)


@backends.register("attention_varlen", "reference")
def _varlen_fwd_reference(q, k, v, cu_q, cu_k, max_q, max_k, gates, active, scale, keep_ungated, dropout_p=0.0,
                          rng=None):
    B = cu_q.numel() - 1
    bq, pq, _ = _varlen_index(cu_q.long(), max_q)
    bk, pk, kvalid = _varlen_index(cu_k.long(), max_k)
    nq, nk = bq.numel(), bk.numel()  # tokens past cu[-1] take no part (outputs 0)
    qp, kp, vp = (_pad_packed(q[:nq], bq, pq, B, max_q), _pad_packed(k[:nk], bk, pk, B, max_k),
                  _pad_packed(v[:nk], bk, pk, B, max_k))
    out, lse, ung = _fwd_reference(qp, kp, vp, kvalid, gates, active, None, DEFAULT_BLOCK_SIZE, scale, False,
                                   keep_ungated, dropout_p, rng)
    T = q.shape[0]
    o = torch.zeros_like(q)
    o[: bq.numel()] = out.transpose(1, 2)[bq, pq]
    ls = torch.full((q.shape[1], T), float("-inf"), dtype=torch.float32, device=q.device)
    ls[:, : bq.numel()] = lse.transpose(1, 2)[bq, pq].T
    u = q.new_empty((0,))
    if keep_ungated:
        u = torch.zeros_like(q)
        u[: bq.numel()] = ung.transpose(1, 2)[bq, pq]
    return o, ls, u


@backends.register("attention_varlen_bwd", "reference")
def _varlen_bwd_reference(grad_out, q, k, v, out, ung, lse, cu_q, cu_k, max_q, max_k, gates, active, scale,
                          dropout_p=0.0, rng=None):
    B = cu_q.numel() - 1
    bq, pq, _ = _varlen_index(cu_q.long(), max_q)
    bk, pk, kvalid = _varlen_index(cu_k.long(), max_k)
    n = bq.numel()
    pad_q = lambda x: _pad_packed(x[:n], bq, pq, B, max_q)  # noqa: E731
    qp, gp = pad_q(q), pad_q(grad_out)
    nk = bk.numel()
    kp, vp = _pad_packed(k[:nk], bk, pk, B, max_k), _pad_packed(v[:nk], bk, pk, B, max_k)
    up = pad_q(ung) if ung.numel() else ung
    lp = _pad_packed(lse[:, :n].T.contiguous(), bq, pq, B, max_q, fill=float("-inf"))  # [B, H, L]
    dq, dk, dv, dg = _bwd_reference(gp, qp, kp, vp, None, up, lp, kvalid, gates, active, None, DEFAULT_BLOCK_SIZE,
                                    scale, False, dropout_p, rng)
    rq, rk, rv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    rq[:n] = dq.transpose(1, 2)[bq, pq]
    rk[:nk] = dk.transpose(1, 2)[bk, pk]
    rv[:nk] = dv.transpose(1, 2)[bk, pk]
    return rq, rk, rv, dg


@backends.register("attention_varlen", "cpu", kernel="attention_train_fwd", limits=VARLEN_KERNEL_LIMITS)
def _varlen_fwd_cpu(q, k, v, cu_q, cu_k, max_q, max_k, gates, active, scale, keep_ungated, dropout_p=0.0, rng=None):
    return torch.ops.kdfast_C.attention_train_fwd(q, k, v, None, cu_q, cu_k, max_q, max_k, gates, active, scale,
                                                  True, keep_ungated, float(dropout_p), rng)


@backends.register("attention_varlen_bwd", "cpu", kernel="attention_train_fwd", limits=VARLEN_KERNEL_LIMITS)
def _varlen_bwd_cpu(grad_out, q, k, v, out, ung, lse, cu_q, cu_k, max_q, max_k, gates, active, scale, dropout_p=0.0,
                    rng=None):
    return torch.ops.kdfast_C.attention_train_bwd(grad_out, q, k, v, ung, lse, None, cu_q, cu_k, max_q, max_k,
                                                  gates, active, scale, True, float(dropout_p), rng,
                                                  gates is not None and ung.numel() > 0)


# Triton: the padded kernels with VARLEN (each program reads its sequence's rows from cu_q / cu_k);
# same limits as the CPU varlen kernels (no block mask, so no tile-size check).
@backends.register("attention_varlen", "triton", limits=VARLEN_KERNEL_LIMITS)
def _varlen_fwd_triton(q, k, v, cu_q, cu_k, max_q, max_k, gates, active, scale, keep_ungated, dropout_p=0.0,
                       rng=None):
    from kdfast.kernels.triton import attention as kt
    return kt.attention_varlen_fwd(q, k, v, cu_q, cu_k, max_q, max_k, gates, active, scale, keep_ungated,
                                   dropout_p, rng)


@backends.register("attention_varlen_bwd", "triton", limits=VARLEN_KERNEL_LIMITS)
def _varlen_bwd_triton(grad_out, q, k, v, out, ung, lse, cu_q, cu_k, max_q, max_k, gates, active, scale,
                       dropout_p=0.0, rng=None):
    from kdfast.kernels.triton import attention as kt
    return kt.attention_varlen_bwd(grad_out, q, k, v, out, ung, lse, cu_q, cu_k, max_q, max_k, gates, active, scale,
                                   dropout_p, rng)


backends.set_gpu_order("attention_varlen", ("triton",))
backends.set_gpu_order("attention_varlen_bwd", ("triton",))


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, head_gates=None,
                     active_heads=None, scale=None, dropout_p=0.0):
    """Attention on packed variable-length sequences (FlashAttention's varlen layout).

    Args:
        q: ``[Tq, H, D]`` the valid query tokens of all sequences, sequence after sequence;
            k, v: ``[Tk, H, D]``.
        cu_seqlens_q, cu_seqlens_k: int ``[B + 1]`` cumulative lengths (``cu[0] = 0``).
        max_seqlen_q, max_seqlen_k: Python ints >= every length (the padded lengths: dropout
            element (b, h, i, j) then draws the same number as in :func:`attention` with
            ``[B, H, max_seqlen_q, max_seqlen_k]`` inputs, so packed equals padded).
        head_gates, active_heads, scale, dropout_p: as in :func:`attention`.

    Returns ``[Tq, H, D]`` (tokens past ``cu_seqlens_q[-1]`` are 0). Differentiable in q, k, v, head_gates.

    Equivalent PyTorch: pad to ``[B, H, max_seqlen, D]``, :func:`attention` with the padding mask
    and ``zero_padded_queries=True``, gather the valid rows back.
    """
    _checks.tensor("q", q, dtypes=_checks.FLOAT_DTYPES, ndim=3)
    _checks.tensor("k", k, dtypes=(q.dtype,), ndim=3)
    _checks.tensor("v", v, dtypes=(q.dtype,), ndim=3)
    if k.shape[1:] != q.shape[1:] or v.shape != k.shape:
        raise ValueError(f"attention_varlen: k, v must be [Tk, H, D] like q {tuple(q.shape)}")
    if cu_seqlens_q.dim() != 1 or cu_seqlens_k.shape != cu_seqlens_q.shape or cu_seqlens_q.dtype.is_floating_point:
        raise ValueError("attention_varlen: cu_seqlens_q/k must be integer [B + 1] tensors of one length")
    if not (isinstance(dropout_p, (int, float)) and 0.0 <= dropout_p < 1.0):
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")
    H = q.shape[1]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    dropout_p = float(dropout_p)
    active = _active_mask(active_heads, H, q.device) if active_heads is not None else None
    rng = draw_dropout_rng(q.device) if dropout_p > 0 else None
    keep_ungated = head_gates is not None and head_gates.requires_grad and torch.is_grad_enabled()
    cu_q, cu_k = cu_seqlens_q.to(torch.int64), cu_seqlens_k.to(torch.int64)
    args = (q, k, v, cu_q, cu_k, int(max_seqlen_q), int(max_seqlen_k), head_gates, active, scale, keep_ungated,
            dropout_p, rng)
    backend = "" if torch.compiler.is_compiling() else backends.explain("attention_varlen", *args).backend
    out, _, _ = _varlen_fwd(*args, backend)
    return out
