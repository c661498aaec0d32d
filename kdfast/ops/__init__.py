"""kdfast ops: one file per op family (schema, fake impl, reference, autograd, dispatch).

Importing this package registers every op with torch.library and the backend
dispatcher (kdfast.backends).

One argument convention for every loss (kd_loss, qa_kd_loss, fused_linear_kd_loss, hidden_mse,
hidden_cosine, attention_kl, attention_score_mse) and the kdfast.nn modules that wrap them::

    loss(student tensors, teacher tensors, [projection], [labels | positions], [mask], *, options)

- positional-or-keyword, in this order: the student's tensors (they get the gradients), then the
  teacher's in the same order (q_s, k_s, q_t, k_t; student_start, student_end, teacher_start,
  teacher_end); then the loss's own learned tensors (hidden_mse's proj_weight, proj_bias); then the
  targets (labels; start_positions, end_positions); then ``mask``;
- ``mask`` is always named ``mask``, optional (None = keep all) and the last positional argument;
  bool, integer or floating, nonzero (True, 1) = keep; ``[B, L]`` (the HF attention_mask) or the
  tensors' leading shape. kd_loss and fused_linear_kd_loss mask rows with ``labels == ignore_index``;
- everything else is keyword-only: temperature, weights, scales, reduction, eps, chunk_size, and the
  optional bias tensors of fused_linear_kd_loss (student_bias=, teacher_bias=);
- ``<op>_reference`` has exactly ``<op>``'s signature (tests/ops/test_signatures.py checks it).

Old names (``attention_mask=``, ``hidden_loss_reference``, LayerKD's old order) still work for one
release with a DeprecationWarning (kdfast/ops/renamed_arguments.py).
"""
# Logit distillation
from kdfast.ops.kd_loss import kd_loss, kd_loss_reference
from kdfast.ops.qa_kd_loss import qa_kd_loss, qa_kd_loss_reference
from kdfast.ops.fused_linear_kd_loss import fused_linear_kd_loss, fused_linear_kd_loss_reference
# Layer distillation
from kdfast.ops.hidden_mse import (hidden_cosine, hidden_cosine_reference, hidden_loss_reference, hidden_mse,
                                   hidden_mse_reference)
from kdfast.ops.attention_score_mse import attention_score_mse, attention_score_mse_reference
from kdfast.ops.attention_kl import attention_kl, attention_kl_reference
# Pruned attention
from kdfast.ops.attention import attention, attention_dropout_mask, attention_reference, attention_varlen
# Ternary weights
from kdfast.ops.ternary_quant import dequantize_ternary, pack_ternary, quantize_activations, ternarize, unpack_ternary
from kdfast.ops.ternary_linear import ternary_linear, ternary_linear_reference

__all__ = [
    "kd_loss", "kd_loss_reference", "qa_kd_loss", "qa_kd_loss_reference", "fused_linear_kd_loss",
    "fused_linear_kd_loss_reference",
    "hidden_mse", "hidden_mse_reference", "hidden_cosine", "hidden_cosine_reference", "hidden_loss_reference", "attention_score_mse", "attention_score_mse_reference",
    "attention_kl", "attention_kl_reference",
    "attention", "attention_reference", "attention_varlen", "attention_dropout_mask",
    "ternarize", "pack_ternary", "unpack_ternary", "dequantize_ternary", "quantize_activations", "ternary_linear",
    "ternary_linear_reference",
]
