"""Drop-in nn.Modules built on kdfast.ops."""
from kdfast.nn.kd_loss import KDLoss

__all__ = ["KDLoss"]
from kdfast.nn.layer_kd import LayerKD, layer_mapping  # noqa: E402

__all__ += ["LayerKD", "layer_mapping"]

from kdfast.nn.gates import HardConcreteGate, SparsityController  # noqa: E402

__all__ += ["HardConcreteGate", "SparsityController"]
