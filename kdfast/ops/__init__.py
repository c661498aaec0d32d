"""kdfast ops: one file per op family (schema, fake impl, reference, autograd, dispatch).

Importing this package registers every op with torch.library and the backend
dispatcher (kdfast.backends).
"""
# Logit distillation
from kdfast.ops.kd_loss import kd_loss, kd_loss_reference
from kdfast.ops.qa_kd_loss import qa_kd_loss, qa_kd_loss_reference
from kdfast.ops.fused_linear_kd_loss import fused_linear_kd_loss, fused_linear_kd_loss_reference
# Layer distillation
from kdfast.ops.hidden_mse import hidden_cosine, hidden_loss_reference, hidden_mse
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
    "hidden_mse", "hidden_cosine", "hidden_loss_reference", "attention_score_mse", "attention_score_mse_reference",
    "attention_kl", "attention_kl_reference",
    "attention", "attention_reference", "attention_varlen", "attention_dropout_mask",
    "ternarize", "pack_ternary", "unpack_ternary", "dequantize_ternary", "quantize_activations", "ternary_linear",
    "ternary_linear_reference",
]
