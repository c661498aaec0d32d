"""Drop-in nn.Modules built on kdfast.ops."""
from kdfast.nn.kd_loss import KDLoss
from kdfast.nn.qa_kd_loss import QAKDLoss
from kdfast.nn.fused_linear_kd_loss import FusedLinearKDLoss

__all__ = ["KDLoss", "QAKDLoss", "FusedLinearKDLoss"]
from kdfast.nn.gates import HardConcreteGate, SparsityController  # noqa: E402

__all__ += ["HardConcreteGate", "SparsityController"]
