"""kdfast ops: one file per op family (schema, fake impl, reference, autograd, dispatch).

Importing this package registers every op with torch.library and the backend
dispatcher (kdfast.backends).
"""
from kdfast.ops.kd_loss import kd_loss, kd_loss_reference
from kdfast.ops.qa_kd_loss import qa_kd_loss, qa_kd_loss_reference
from kdfast.ops.fused_linear_kd_loss import fused_linear_kd_loss, fused_linear_kd_loss_reference

__all__ = ["kd_loss", "kd_loss_reference", "qa_kd_loss", "qa_kd_loss_reference", "fused_linear_kd_loss",
           "fused_linear_kd_loss_reference"]
from kdfast.ops.attention import attention, attention_reference  # noqa: E402

__all__ += ["attention", "attention_reference"]
