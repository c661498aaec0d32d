"""MiniLM attention-distribution (and value-relation) loss without L x L maps.

Backends:

    cpu:       csrc/cpu/attention_kl.cpp (fwd writes the gradients; bwd scales them;
               value relation: dispatch name "attention_kl_shared", kernel attention_kl_shared_fwd)
    triton:    kdfast/kernels/triton/attention_kl.py (same; value relation: both gradients added)
    cuda:      none (Triton on GPU)
    reference: this file
    backward:  kdfast/ops/loss_grad_autograd.py (16-bit GPU inputs and a second backward rerun
               the fwd kernel with grad_output as the gradient weight)

loss = mean over heads and valid query rows of
KL(softmax(q_t k_t^T * scale_t) || softmax(q_s k_s^T * scale_s)), the
softmaxes taken over valid keys only:

    sum_{b, h, i: mask[b, i]} KL_i[b, h]  /  (H * sum_b n_b)

(0 when no token is valid). The value-relation loss of MiniLM is the same op
on (v, v): ``attention_kl(v_s, v_s, v_t, v_t, mask)``.

How the kernels avoid the maps: KL_i = E_{p_t}[S_t - S_s] - lse_t + lse_s,
and E_{p_t}[S_t - S_s] accumulates with the same running-max rescaling as the
teacher's softmax denominator, so one streaming pass over key blocks gives the
two log-sum-exps and the KL of each query row (Triton: key blocks of 32-64;
CPU: tiles of 64-512 query rows x all valid keys, at most ~1.3 MB per thread,
the products on BLAS, padded tokens skipped). The
gradient of the summed loss w.r.t. S_s is p_s - p_t, so the kernels produce
d/dq_s = scale_s (p_s - p_t) k_s and d/dk_s = scale_s (p_s - p_t)^T q_s in the
same run (a second streaming pass on Triton); autograd only scales them. For
the value relation (q_s and k_s one tensor) the CPU kernel writes their sum
into one buffer.
"""
from __future__ import annotations

import torch

from kdfast import backends
from kdfast.ops import attention_map_loss as _inputs
from kdfast.ops.loss_grad_autograd import forward_grads, grad_dtype, register_loss_grad_autograd

OP = "attention_kl"
_MASKED = -1e30  # finite stand-in for -inf on padded keys: exp() gives exactly 0, never NaN


def _log_probs(q, k, scale, mask, acc):
    s = (q.to(acc) @ k.to(acc).transpose(-1, -2)) * scale
    keep_key = (mask != 0)[:, None, None, :]
    s = torch.where(keep_key, s, torch.full((), _MASKED, dtype=acc, device=s.device))
    return torch.log_softmax(s, dim=-1)


def attention_kl_reference(q_s, k_s, q_t, k_t, mask=None, *, scale_s=None, scale_t=None):
    """The specification: materialises both [B, H, L, L] distributions (autograd through PyTorch).

    Computes in float32 (float64 for float64 inputs) and returns a 0-d tensor of that dtype.
    """
    m, scale_s, scale_t = _inputs.check(q_s, k_s, q_t, k_t, mask, scale_s, scale_t, OP)
    acc = torch.float64 if q_s.dtype == torch.float64 else torch.float32
    logp_s = _log_probs(q_s, k_s, scale_s, m, acc)
    logp_t = _log_probs(q_t, k_t, scale_t, m, acc)
    pair = _inputs.pair_mask(m)
    kl = torch.where(pair, logp_t.exp() * (logp_t - logp_s), torch.zeros((), dtype=acc, device=m.device))
    count = q_s.shape[1] * m.to(acc).sum()
    return kl.sum() / count.clamp(min=1)


# --------------------------------------------------------------------------
# Custom op: per-(b, h) sums of row KLs, and (when compute_grad) the gradient
# of their sum w.r.t. q_s and k_s: float32 "unit" gradients, or with
# grad_weight [B, H] the gradient of sum(grad_weight * loss) in the inputs'
# dtypes.
# --------------------------------------------------------------------------
@torch.library.custom_op("kdfast::attention_kl_fwd", mutates_args=())
def _fwd(q_s: torch.Tensor, k_s: torch.Tensor, q_t: torch.Tensor, k_t: torch.Tensor, mask: torch.Tensor,
         scale_s: float, scale_t: float, compute_grad: bool, grad_weight: torch.Tensor | None, backend: str
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return backends.run(OP, q_s, k_s, q_t, k_t, mask, scale_s, scale_t, compute_grad, grad_weight,
                        backend=backend or None)


_fwd.register_fake(_inputs.fake_pair_loss)
register_loss_grad_autograd(_fwd, grads_for=("q_s", "k_s"))


@backends.register(OP, "reference")
def _fwd_reference(q_s, k_s, q_t, k_t, mask, scale_s, scale_t, compute_grad, grad_weight):
    """Materialised maps with the gradient written out: d/dS_s = p_s - p_t on valid pairs."""
    acc = torch.float64 if q_s.dtype == torch.float64 else torch.float32
    logp_s = _log_probs(q_s, k_s, scale_s, mask, acc)
    logp_t = _log_probs(q_t, k_t, scale_t, mask, acc)
    pair = _inputs.pair_mask(mask)
    zero = torch.zeros((), dtype=acc, device=mask.device)
    p_t = logp_t.exp()
    loss = torch.where(pair, p_t * (logp_t - logp_s), zero).sum((-1, -2)).float()
    if not compute_grad:
        empty = q_s.new_empty((0,), dtype=torch.float32)
        return loss, empty, empty.clone()
    ds = torch.where(pair, logp_s.exp() - p_t, zero)
    dq = scale_s * (ds @ k_s.to(acc))
    dk = scale_s * (ds.transpose(-1, -2) @ q_s.to(acc))
    return (loss, *_inputs.weighted(dq, dk, q_s, k_s, grad_weight))


@backends.register(OP, "cpu", limits=_inputs.KERNEL_LIMITS, kernel="attention_kl_fwd")
def _fwd_cpu(q_s, k_s, q_t, k_t, mask, scale_s, scale_t, compute_grad, grad_weight):
    return torch.ops.kdfast_C.attention_kl_fwd(q_s, k_s, q_t, k_t, mask, scale_s, scale_t, compute_grad,
                                               grad_weight)


@backends.register(OP, "triton", limits=_inputs.KERNEL_LIMITS)
def _fwd_triton(q_s, k_s, q_t, k_t, mask, scale_s, scale_t, compute_grad, grad_weight):
    from kdfast.kernels.triton import attention_kl as k
    return k.attention_kl_fwd(q_s, k_s, q_t, k_t, mask, scale_s, scale_t, compute_grad, grad_weight)


backends.set_gpu_order(OP, ("triton",))


# --------------------------------------------------------------------------
# Value relation: one student tensor x_s as both q_s and k_s. One gradient
# buffer, d(sum loss)/dx_s = (dq_s + dk_s), instead of two that autograd adds.
# Dispatch name "attention_kl_shared"; its backend is the one chosen under
# "attention_kl" (same forcing, same checks). The CPU kernel accumulates both
# terms into one buffer; the other backends run their "attention_kl" and add
# dk_s into dq_s in place.
# --------------------------------------------------------------------------
SHARED = "attention_kl_shared"


@backends.register(SHARED, "cpu", kernel="attention_kl_shared_fwd")
def _shared_cpu(x_s, q_t, k_t, mask, scale_s, scale_t, compute_grad, grad_weight):
    return torch.ops.kdfast_C.attention_kl_shared_fwd(x_s, q_t, k_t, mask, scale_s, scale_t, compute_grad,
                                                      grad_weight)


def _shared_from_pair(backend):
    def shared(x_s, q_t, k_t, mask, scale_s, scale_t, compute_grad, grad_weight):
        # Float32 unit gradients of both roles, added, then weighted: one rounding to x_s's dtype.
        loss, dq, dk = backends.run(OP, x_s, x_s, q_t, k_t, mask, scale_s, scale_t, compute_grad, None,
                                    backend=backend)
        if not compute_grad:
            return loss, dq
        dq.add_(dk)
        if grad_weight is not None:
            dq = dq.mul_(grad_weight[:, :, None, None]).to(x_s.dtype)
        return loss, dq
    shared.__name__ = f"_shared_{backend}"
    return shared


for _backend in ("reference", "triton"):
    backends.register(SHARED, _backend)(_shared_from_pair(_backend))


@torch.library.custom_op("kdfast::attention_kl_shared_fwd", mutates_args=())
def _fwd_shared(x_s: torch.Tensor, q_t: torch.Tensor, k_t: torch.Tensor, mask: torch.Tensor, scale_s: float,
                scale_t: float, compute_grad: bool, grad_weight: torch.Tensor | None, backend: str
                ) -> tuple[torch.Tensor, torch.Tensor]:
    backend = backend or backends.choose(OP, x_s, x_s, q_t, k_t)
    return backends.run(SHARED, x_s, q_t, k_t, mask, scale_s, scale_t, compute_grad, grad_weight,
                        backend=backend)


@_fwd_shared.register_fake
def _(x_s, q_t, k_t, mask, scale_s, scale_t, compute_grad, grad_weight, backend):
    B, H, L, D = x_s.shape
    if not compute_grad:
        return x_s.new_empty((B, H), dtype=torch.float32), x_s.new_empty((0,), dtype=torch.float32)
    return (x_s.new_empty((B, H), dtype=torch.float32),
            x_s.new_empty((B, H, L, D), dtype=grad_dtype(x_s, grad_weight)))


register_loss_grad_autograd(_fwd_shared, grads_for=("x_s",))


def _same_tensor(a, b):
    """a and b are one tensor: the same object, or (eager only) the same memory, layout and autograd role."""
    if a is b:
        return True
    if torch.compiler.is_compiling():
        return False
    # Two leaves that both want a gradient must each get their own, even over the same memory.
    return (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
            and a.dtype == b.dtype and a.requires_grad == b.requires_grad and not (a.is_leaf and a.requires_grad))


def attention_kl(q_s, k_s, q_t, k_t, mask=None, *, scale_s=None, scale_t=None):
    """MiniLM attention transfer KL(teacher || student) from q and k, without L x L maps.

    Args:
        q_s, k_s: student ``[B, H, L, D_s]`` (float32/bfloat16/float16; float64 runs on the
            reference backend). Get gradients.
        q_t, k_t: teacher ``[B, H, L, D_t]``; same B, H (clear error otherwise) and L; head
            dims may differ. Get no gradient.
        mask: optional ``[B, L]`` padding mask, nonzero = keep. Padded keys are left out
            of both softmaxes, padded query rows out of the mean.
        scale_s, scale_t: score scales, default ``1 / sqrt(D)`` of each model.

    Value relation (MiniLM): ``attention_kl(v_s, v_s, v_t, v_t, mask)``. When q_s and k_s are
    one tensor (the same object, or the same memory and strides, not two separate leaves) the
    gradient of both roles is accumulated into one buffer (CPU kernel).

    float32 students: the gradient is computed in the forward and the first backward only
    scales it. 16-bit students: the gradient is written in the students' dtype, never as a
    float32 copy (a quarter of the peak memory); on the CPU by the forward, handed over
    as it is when grad_output is 1 and multiplied by grad_output in place otherwise (one
    more rounding); on a GPU by the backward. A second backward through the same graph
    (retain_graph=True) recomputes it from the saved inputs (the loss keeps references to
    its inputs, teacher included, until the graph is freed).

    Returns a float32 0-d tensor: sum of row KLs / (H * number of valid tokens).

    Equivalent PyTorch (materialising, mask all ones)::

        ls = torch.log_softmax(q_s @ k_s.transpose(-1, -2) * scale_s, -1)
        lt = torch.log_softmax(q_t @ k_t.transpose(-1, -2) * scale_t, -1)
        (lt.exp() * (lt - ls)).sum(-1).mean()
    """
    m, scale_s, scale_t = _inputs.check(q_s, k_s, q_t, k_t, mask, scale_s, scale_t, OP)
    # Under torch.compile the choice happens inside the op at run time (dynamo cannot trace it).
    backend = "" if torch.compiler.is_compiling() else backends.explain(OP, q_s, k_s, q_t, k_t).backend
    count = (q_s.shape[1] * m.sum()).clamp(min=1)
    if _same_tensor(q_s, k_s):  # value relation: one gradient buffer
        grad = forward_grads((q_s,), count, q_s.shape[:2])
        loss_bh, _ = _fwd_shared(q_s, q_t, k_t, m, scale_s, scale_t, *grad, backend)
    else:
        grad = forward_grads((q_s, k_s), count, q_s.shape[:2])
        loss_bh, _, _ = _fwd(q_s, k_s, q_t, k_t, m, scale_s, scale_t, *grad, backend)
    return loss_bh.sum() / count
