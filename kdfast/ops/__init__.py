"""kdfast ops: one file per op family (schema, fake impl, reference, autograd, dispatch).

Importing this package registers every op with torch.library and the backend
dispatcher (kdfast.backends).
"""
from kdfast.ops.kd_loss import kd_loss, kd_loss_reference

__all__ = ["kd_loss", "kd_loss_reference"]
from kdfast.ops.ternary_quant import (  # noqa: E402
    dequantize_ternary, pack_ternary, quantize_activations, ternarize, unpack_ternary)
from kdfast.ops.ternary_linear import ternary_linear, ternary_linear_reference  # noqa: E402

__all__ += ["ternarize", "pack_ternary", "unpack_ternary", "dequantize_ternary", "quantize_activations",
            "ternary_linear", "ternary_linear_reference"]
