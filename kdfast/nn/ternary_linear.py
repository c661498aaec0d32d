"""TernaryLinear: a drop-in ``nn.Linear`` with 2-bit ternary weights.

Two forms:

* QAT form (``qat=True``): keeps a latent full-precision ``weight``
  parameter. In training mode the forward fake-quantizes it (ternarize, then
  straight-through estimator: the gradient reaches the latent weight, zeroed
  where ``|W| > clip``, and the input); with ``act_bits=8`` activations are
  fake-quantized per token, straight through. In eval mode it runs the packed
  fast kernel on weights packed from the latent ones (cached).
* Inference form (``qat=False``, the default of ``from_linear``): no latent
  weight; only ``packed_weight`` (uint8 ``[N, 16 * ceil(K / 64)]``),
  ``weight_scale`` (float32 ``[N]`` or ``[1]``) and ``bias``. Its state_dict is
  ~16x smaller than the fp32 layer's.

In both forms ``state_dict`` holds the packed weights and scales (the QAT form
adds its latent weight so training can resume). :meth:`freeze` turns a QAT
layer into the inference form. The packed / latent bookkeeping is
:class:`kdfast.nn.ternary_weight.TernaryWeight`'s (shared with TernaryEmbedding).
"""
from __future__ import annotations

import torch
from torch import nn

from kdfast.nn.ternary_weight import TernaryWeight
from kdfast.ops.ternary_linear import ternary_linear
from kdfast.ops.ternary_quant import quantize_activations


class _FakeQuantAct(torch.autograd.Function):
    """Per-token int8 fake quantization with a straight-through gradient."""

    @staticmethod
    def forward(ctx, x, bits):
        q, s = quantize_activations(x, bits=bits)
        return (q.float() * s.unsqueeze(-1)).to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        return g, None


class TernaryLinear(TernaryWeight):
    """``y = x @ (codes * scale)^T + bias`` with codes in {-1, 0, 1}.

    Args:
        in_features, out_features, bias: as ``nn.Linear``.
        method: ``"twn"``, ``"absmean"`` or ``"lat"`` (see :func:`kdfast.ops.ternarize`).
        granularity: ``"row"`` (scale per output feature) or ``"tensor"``.
        act_bits: None (float activations) or 8 (W2A8, per-token int8).
        qat: keep a latent float weight for quantization-aware training.
        clip: weight clipping bound of twn/lat; the STE gradient is 0 beyond it.

    Input ``[..., in_features]`` float32/bfloat16/float16, output ``[..., out_features]`` same dtype.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, method: str = "twn",
                 granularity: str = "row", act_bits: int | None = None, qat: bool = False, clip: float = 2.5,
                 device=None, dtype=None):
        super().__init__()
        if act_bits not in (None, 8):
            raise ValueError(f"act_bits must be None or 8, got {act_bits!r}")
        self.in_features, self.out_features = int(in_features), int(out_features)
        self._setup_ternary(self.out_features, self.in_features, method=method, granularity=granularity,
                            clip=clip, device=device)
        self.act_bits = act_bits
        if bias:
            self.bias = nn.Parameter(torch.zeros(self.out_features, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)
        if qat:
            w = torch.empty(self.out_features, self.in_features, device=device, dtype=dtype)
            nn.init.kaiming_uniform_(w, a=5 ** 0.5)
            self._set_latent(w)

    # ---- construction ---------------------------------------------------------
    @classmethod
    def from_linear(cls, linear: nn.Linear, *, method: str = "twn", granularity: str = "row",
                    act_bits: int | None = None, qat: bool = False, clip: float = 2.5) -> "TernaryLinear":
        """Ternarize ``linear`` (its weight and bias are copied; the original is left untouched)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        w = linear.weight
        m = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, method=method,
                granularity=granularity, act_bits=act_bits, qat=False, clip=clip, device=w.device)
        if linear.bias is not None:
            m.bias = nn.Parameter(linear.bias.detach().clone())
        m._take_weight(w, qat)
        return m

    # ---- forward ----------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is not None and self.training:
            return self._forward_qat(x)
        self._refresh_if_stale()
        return ternary_linear(x, self.packed_weight, self.weight_scale, self.bias, act_bits=self.act_bits)

    def _forward_qat(self, x):
        w_ste = self.fake_quantized_weight()
        if self.act_bits is not None:
            x = _FakeQuantAct.apply(x, self.act_bits)
        return nn.functional.linear(x, w_ste.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"method={self.method}, granularity={self.granularity}, act_bits={self.act_bits}, qat={self.qat}")
