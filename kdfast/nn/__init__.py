"""Drop-in nn.Modules built on kdfast.ops."""
from kdfast.nn.kd_loss import KDLoss

__all__ = ["KDLoss"]
from kdfast.nn.ternary_linear import TernaryLinear  # noqa: E402

__all__ += ["TernaryLinear"]
