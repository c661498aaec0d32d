"""Drop-in nn.Modules built on kdfast.ops."""
from kdfast.nn.kd_loss import KDLoss

__all__ = ["KDLoss"]
