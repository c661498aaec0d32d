"""TinyBERT attention-score loss without L x L maps.

Backends:

    cpu:       csrc/cpu/attention_score_mse.cpp (fwd writes the gradients; bwd scales them)
    triton:    kdfast/kernels/triton/attention_score_mse.py (same)
    cuda:      none (Triton on GPU)
    reference: this file
    backward:  kdfast/ops/loss_grad_autograd.py (16-bit GPU inputs and a second backward rerun
               the fwd kernel with grad_output as the gradient weight)

loss = mean over heads of the MSE between the pre-softmax scores
S_s = q_s k_s^T * scale_s and S_t = q_t k_t^T * scale_t over the valid
(query, key) pairs, i.e.

    sum_{b, h, i, j: mask[b, i] and mask[b, j]} (S_s - S_t)[b, h, i, j]^2
    ----------------------------------------------------------------------
                      H * sum_b n_b^2          (n_b = valid tokens of b)

(0 when no pair is valid). Padded keys AND padded queries are excluded, not
zeroed and averaged as in TinyBERT's code, so the loss does not depend on the
amount of padding.

How the kernels avoid the maps: with Q = [q_s * scale_s | q_t * scale_t] and
K = [k_s | -k_t] (padded rows dropped or zeroed), S_s - S_t = Q K^T and
||Q K^T||_F^2 = <Q^T Q, K^T K>, two (Ds+Dt) x (Ds+Dt) Gram matrices per head:
O(L (Ds+Dt)^2) time, O((Ds+Dt)^2) extra memory, exact in exact arithmetic.
The gradient is 2 Q (K^T K) for Q and 2 K (Q^T Q) for K, of which the
student blocks are kept. (The CPU kernel computes only the three distinct
blocks of each Gram matrix, q_s^T q_s, q_s^T q_t, q_t^T q_t and the same for
k, and reads the valid rows in place when it can.) Caveat: the Gram form computes ||S_s||^2 + ||S_t||^2
- 2 <S_s, S_t> in float32, so when the student matches the teacher to
relative error e the loss has relative error ~1e-7 / e^2 (fine for training
signals; use the reference backend to measure tiny losses exactly).
"""
from __future__ import annotations

import torch

from kdfast import backends
from kdfast.ops import attention_map_loss as _inputs
from kdfast.ops.loss_grad_autograd import forward_grads, register_loss_grad_autograd

OP = "attention_score_mse"


def attention_score_mse_reference(q_s, k_s, q_t, k_t, mask=None, *, scale_s=None, scale_t=None):
    """The specification: materialises both [B, H, L, L] score maps (autograd through PyTorch).

    Computes in float32 (float64 for float64 inputs) and returns a 0-d tensor of that dtype.
    """
    m, scale_s, scale_t = _inputs.check(q_s, k_s, q_t, k_t, mask, scale_s, scale_t, OP)
    acc = torch.float64 if q_s.dtype == torch.float64 else torch.float32
    s = (q_s.to(acc) @ k_s.to(acc).transpose(-1, -2)) * scale_s
    t = (q_t.to(acc) @ k_t.to(acc).transpose(-1, -2)) * scale_t
    pair = _inputs.pair_mask(m)
    sq = torch.where(pair, (s - t) ** 2, torch.zeros((), dtype=acc, device=s.device))
    n = m.to(acc).sum(-1)
    count = q_s.shape[1] * (n * n).sum()
    return sq.sum() / count.clamp(min=1)


# --------------------------------------------------------------------------
# Custom op: per-(b, h) sums of squared differences, and (when compute_grad)
# the gradient of their sum w.r.t. q_s and k_s: float32 "unit" gradients, or with
# grad_weight [B, H] the gradient of sum(grad_weight * loss) in the inputs' dtypes.
# --------------------------------------------------------------------------
@torch.library.custom_op("kdfast::attention_score_mse_fwd", mutates_args=())
def _fwd(q_s: torch.Tensor, k_s: torch.Tensor, q_t: torch.Tensor, k_t: torch.Tensor, mask: torch.Tensor,
         scale_s: float, scale_t: float, compute_grad: bool, grad_weight: torch.Tensor | None, backend: str
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return backends.run(OP, q_s, k_s, q_t, k_t, mask, scale_s, scale_t, compute_grad, grad_weight,
                        backend=backend or None)


_fwd.register_fake(_inputs.fake_pair_loss)
register_loss_grad_autograd(_fwd, grads_for=("q_s", "k_s"))


@backends.register(OP, "reference")
def _fwd_reference(q_s, k_s, q_t, k_t, mask, scale_s, scale_t, compute_grad, grad_weight):
    """Materialised maps with the gradient written out: d/dS_s = 2 (S_s - S_t) on valid pairs."""
    acc = torch.float64 if q_s.dtype == torch.float64 else torch.float32
    qs, ks = q_s.to(acc), k_s.to(acc)
    s = (qs @ ks.transpose(-1, -2)) * scale_s
    t = (q_t.to(acc) @ k_t.to(acc).transpose(-1, -2)) * scale_t
    diff = torch.where(_inputs.pair_mask(mask), s - t, torch.zeros((), dtype=acc, device=s.device))
    loss = (diff * diff).sum((-1, -2)).float()
    if not compute_grad:
        empty = q_s.new_empty((0,), dtype=torch.float32)
        return loss, empty, empty.clone()
    dq = (2 * scale_s) * (diff @ ks)
    dk = (2 * scale_s) * (diff.transpose(-1, -2) @ qs)
    return (loss, *_inputs.weighted(dq, dk, q_s, k_s, grad_weight))


@backends.register(OP, "cpu", limits=_inputs.KERNEL_LIMITS, kernel="attention_score_mse_fwd")
def _fwd_cpu(q_s, k_s, q_t, k_t, mask, scale_s, scale_t, compute_grad, grad_weight):
    return torch.ops.kdfast_C.attention_score_mse_fwd(q_s, k_s, q_t, k_t, mask, scale_s, scale_t, compute_grad,
                                                      grad_weight)


@backends.register(OP, "triton", limits=_inputs.KERNEL_LIMITS)
def _fwd_triton(q_s, k_s, q_t, k_t, mask, scale_s, scale_t, compute_grad, grad_weight):
    from kdfast.kernels.triton import attention_score_mse as k
    return k.attention_score_mse_fwd(q_s, k_s, q_t, k_t, mask, scale_s, scale_t, compute_grad, grad_weight)


backends.set_gpu_order(OP, ("triton",))


def attention_score_mse(q_s, k_s, q_t, k_t, mask=None, *, scale_s=None, scale_t=None):
    """TinyBERT attention loss from q and k, without materialising the L x L score maps.

    Args:
        q_s, k_s: student queries and keys ``[B, H, L, D_s]`` (float32/bfloat16/float16;
            float64 runs on the reference backend). Get gradients.
        q_t, k_t: teacher queries and keys ``[B, H, L, D_t]``; same B, H, L (head dims may
            differ). Get no gradient.
        mask: optional ``[B, L]`` padding mask, nonzero = keep (bool, int or float).
        scale_s, scale_t: score scales, default ``1 / sqrt(D)`` of each model.

    Returns a float32 0-d tensor: the mean over heads of the MSE over valid
    (query, key) pairs (sum of squared differences / (H * sum_b n_b^2)).

    float32 students: the gradient is computed in the forward and the first backward only
    scales it. 16-bit students: the gradient is written in the students' dtype, never as a
    float32 copy; on the CPU by the forward, handed over as it is when grad_output is 1 and
    multiplied by grad_output in place otherwise (one more rounding); on a GPU by the
    backward. A second backward through the same graph (retain_graph=True) recomputes it from
    the saved inputs.

    Equivalent PyTorch (materialising)::

        s = q_s @ k_s.transpose(-1, -2) * scale_s
        t = q_t @ k_t.transpose(-1, -2) * scale_t
        keep = mask.bool(); pair = keep[:, None, :, None] & keep[:, None, None, :]
        ((s - t)[pair.expand_as(s)] ** 2).mean()
    """
    m, scale_s, scale_t = _inputs.check(q_s, k_s, q_t, k_t, mask, scale_s, scale_t, OP)
    # Under torch.compile the choice happens inside the op at run time (dynamo cannot trace it).
    backend = "" if torch.compiler.is_compiling() else backends.explain(OP, q_s, k_s, q_t, k_t).backend
    n = m.sum(-1)
    count = (q_s.shape[1] * (n * n).sum()).clamp(min=1)
    grad = forward_grads((q_s, k_s), count, q_s.shape[:2])
    loss_bh, _, _ = _fwd(q_s, k_s, q_t, k_t, m, scale_s, scale_t, *grad, backend)
    return loss_bh.sum() / count
