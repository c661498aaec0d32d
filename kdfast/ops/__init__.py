"""kdfast ops: one file per op family (schema, fake impl, reference, autograd, dispatch).

Importing this package registers every op with torch.library and the backend
dispatcher (kdfast.backends).
"""
from kdfast.ops.kd_loss import kd_loss, kd_loss_reference

__all__ = ["kd_loss", "kd_loss_reference"]
from kdfast.ops.hidden_mse import hidden_cosine, hidden_loss_reference, hidden_mse  # noqa: E402
from kdfast.ops.attention_score_mse import attention_score_mse, attention_score_mse_reference  # noqa: E402
from kdfast.ops.attention_kl import attention_kl, attention_kl_reference  # noqa: E402

__all__ += ["hidden_mse", "hidden_cosine", "hidden_loss_reference", "attention_score_mse",
            "attention_score_mse_reference", "attention_kl", "attention_kl_reference"]

from kdfast.ops.attention import attention, attention_reference  # noqa: E402

__all__ += ["attention", "attention_reference"]
