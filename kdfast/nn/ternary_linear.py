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
layer into the inference form.
"""
from __future__ import annotations

import torch
from torch import nn

from kdfast.ops.ternary_linear import ternary_linear
from kdfast.ops.ternary_quant import (GRANULARITIES, METHODS, packed_columns, pack_ternary, quantize_activations,
                                      ternarize, dequantize_ternary)


class _FakeQuantAct(torch.autograd.Function):
    """Per-token int8 fake quantization with a straight-through gradient."""

    @staticmethod
    def forward(ctx, x, bits):
        q, s = quantize_activations(x, bits=bits)
        return (q.float() * s.unsqueeze(-1)).to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        return g, None


class TernaryLinear(nn.Module):
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
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
        if act_bits not in (None, 8):
            raise ValueError(f"act_bits must be None or 8, got {act_bits!r}")
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.method, self.granularity, self.act_bits, self.clip = method, granularity, act_bits, float(clip)
        n_scale = self.out_features if granularity == "row" else 1
        self.register_buffer("packed_weight", torch.full((self.out_features, packed_columns(self.in_features)),
                                                         0x55, dtype=torch.uint8, device=device))
        self.register_buffer("weight_scale", torch.zeros(n_scale, dtype=torch.float32, device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(self.out_features, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)
        if qat:
            w = torch.empty(self.out_features, self.in_features, device=device, dtype=dtype)
            nn.init.kaiming_uniform_(w, a=5 ** 0.5)
            self.weight = nn.Parameter(w)
            self.refresh_packed()
        else:
            self.register_parameter("weight", None)
        self._packed_version = None if self.weight is None else self.weight._version

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
        with torch.no_grad():
            if linear.bias is not None:
                m.bias = nn.Parameter(linear.bias.detach().clone())
            if qat:
                m.weight = nn.Parameter(w.detach().clone())
                m.refresh_packed()
            else:
                m._pack_from(w.detach())
        return m

    @property
    def qat(self) -> bool:
        return self.weight is not None

    def _ternarize(self, w):
        return ternarize(w, self.method, self.granularity, clip=self.clip)

    @torch.no_grad()
    def _pack_from(self, w):
        codes, scale = self._ternarize(w)
        self.packed_weight.copy_(pack_ternary(codes))
        self.weight_scale.copy_(scale)

    @torch.no_grad()
    def refresh_packed(self):
        """Re-pack from the latent weight (QAT form); no-op for the inference form."""
        if self.weight is not None:
            self._pack_from(self.weight)
            self._packed_version = self.weight._version

    def freeze(self) -> "TernaryLinear":
        """Drop the latent weight: the layer becomes the packed inference form (in place)."""
        if self.weight is not None:
            self.refresh_packed()
            self.weight = None
        return self

    def dequantized_weight(self, dtype=torch.float32) -> torch.Tensor:
        """Dense ``[out, in]`` weight ``codes * scale`` (for inspection / export)."""
        return dequantize_ternary(self.packed_weight, self.weight_scale, self.in_features, dtype)

    # ---- forward ----------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is not None and self.training:
            return self._forward_qat(x)
        if self.weight is not None and self._packed_version != self.weight._version:
            self.refresh_packed()
        return ternary_linear(x, self.packed_weight, self.weight_scale, self.bias, act_bits=self.act_bits)

    def _forward_qat(self, x):
        w = self.weight
        codes, scale = self._ternarize(w)
        wq = (codes.to(w.dtype) * scale.to(w.dtype).reshape(-1, 1))
        keep = (w.abs() <= self.clip) if self.method != "absmean" else torch.ones_like(w, dtype=torch.bool)
        # Straight-through: value wq, gradient to w (zero where clipped).
        w_ste = wq + (w - w.detach()) * keep
        if self.act_bits is not None:
            x = _FakeQuantAct.apply(x, self.act_bits)
        return nn.functional.linear(x, w_ste.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if self.weight is not None and self._packed_version != self.weight._version:
            self.refresh_packed()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"method={self.method}, granularity={self.granularity}, act_bits={self.act_bits}, qat={self.qat}")
