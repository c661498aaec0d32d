"""Drop-in nn.Modules built on kdfast.ops."""
from kdfast.nn.kd_loss import KDLoss
from kdfast.nn.qa_kd_loss import QAKDLoss
from kdfast.nn.fused_linear_kd_loss import FusedLinearKDLoss
from kdfast.nn.layer_kd import LayerKD, layer_mapping
from kdfast.nn.gates import HardConcreteGate, SparsityController
from kdfast.nn.ternary_linear import TernaryLinear
from kdfast.nn.ternary_embedding import TernaryEmbedding

__all__ = ["KDLoss", "QAKDLoss", "FusedLinearKDLoss", "LayerKD", "layer_mapping", "HardConcreteGate",
           "SparsityController", "TernaryLinear", "TernaryEmbedding"]
