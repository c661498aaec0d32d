"""Launch helpers shared by the attention-map loss kernels (attention_kl.py,
attention_score_mse.py): tile widths and the gradient buffers they write.

Both kernels:
all dots run in float32 with input_precision="ieee" (exact float32, no TF32),
so float32 results match the float64 oracle like PyTorch's float32 matmul.
Launchers take CPU tensors under TRITON_INTERPRET=1 (tests) or CUDA tensors.
Loop bounds (L, E) are compile-time constants: one compile per sequence
length, and the triton 3.6 interpreter cannot loop to a runtime bound under
numpy >= 2.4.
"""
from __future__ import annotations

import torch
import triton


def block(d: int) -> int:
    """Tile width for a dimension of size d: a power of two, at least 16 (tl.dot's minimum)."""
    return max(16, triton.next_power_of_2(int(d)))


def grad_buffers(q_s, k_s, grad_weight):
    """Gradient buffers: float32 unit gradients, or the inputs' dtypes when grad_weight [B, H] weights them;
    and the weight argument of the kernels (a dummy pointer when absent)."""
    B, H, L, Ds = q_s.shape
    dq = torch.empty(B, H, L, Ds, dtype=torch.float32 if grad_weight is None else q_s.dtype, device=q_s.device)
    dk = torch.empty(B, H, L, Ds, dtype=torch.float32 if grad_weight is None else k_s.dtype, device=q_s.device)
    w = dq if grad_weight is None else grad_weight.float().contiguous()
    return dq, dk, w
