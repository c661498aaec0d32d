"""TernaryWeight: what TernaryLinear and TernaryEmbedding share.

A ternary module holds one ``[rows, cols]`` weight as 2-bit codes plus scales:

* ``packed_weight``: uint8 ``[rows, 16 * ceil(cols / 64)]`` (the layout of
  :mod:`kdfast.ops.ternary_quant`);
* ``weight_scale``: float32 ``[rows]`` (``granularity="row"``) or ``[1]`` (``"tensor"``);
* in the QAT form only, ``weight``: the latent full-precision ``[rows, cols]``
  parameter. Training reads it through :meth:`TernaryWeight.fake_quantized_weight`
  (ternary value, straight-through gradient); the packed buffers are re-made from
  it when it has changed (tracked with the tensor's version counter).

:meth:`TernaryWeight.freeze` drops the latent weight: the inference form's
state_dict is the packed codes and scales (plus whatever the subclass adds, e.g. a bias).
"""
from __future__ import annotations

import torch
from torch import nn

from kdfast.ops.ternary_quant import (GRANULARITIES, METHODS, dequantize_ternary, pack_ternary, packed_columns,
                                      ternarize)

ALL_ZERO_BYTE = 0x55  # four 2-bit codes 1, i.e. four weights 0


def check_ternary_options(method: str, granularity: str, clip: float) -> float:
    """ValueError naming the argument for a bad method / granularity / clip; returns ``float(clip)``."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if isinstance(clip, bool) or not isinstance(clip, (int, float)) or not clip > 0:
        raise ValueError(f"clip must be a positive number, got {clip!r}")
    return float(clip)


class TernaryWeight(nn.Module):
    """Base of the ternary modules: packed codes + scales, optional latent weight (QAT form)."""

    def _setup_ternary(self, rows: int, cols: int, *, method: str, granularity: str, clip: float, device=None):
        """Register the (all-zero) packed buffers and an empty latent weight; call from ``__init__``."""
        self.clip = check_ternary_options(method, granularity, clip)
        self.method, self.granularity = method, granularity
        self._ternary_cols = int(cols)
        n_scale = int(rows) if granularity == "row" else 1
        self.register_buffer("packed_weight", torch.full((int(rows), packed_columns(self._ternary_cols)),
                                                         ALL_ZERO_BYTE, dtype=torch.uint8, device=device))
        self.register_buffer("weight_scale", torch.zeros(n_scale, dtype=torch.float32, device=device))
        self.register_parameter("weight", None)
        self._packed_version = None

    def _set_latent(self, w: torch.Tensor) -> None:
        """Make this the QAT form with latent weight ``w`` (``[rows, cols]``) and pack it."""
        self.weight = nn.Parameter(w)
        self.refresh_packed()

    @torch.no_grad()
    def _take_weight(self, w: torch.Tensor, qat: bool) -> None:
        """Ternarize a float module's weight ``w`` (copied, never aliased): latent weight (QAT form)
        or packed codes only."""
        if qat:
            self._set_latent(w.detach().clone())
        else:
            self._pack_from(w.detach())

    @property
    def qat(self) -> bool:
        return self.weight is not None

    @property
    def num_weights(self) -> int:
        """Logical weights ``rows * cols`` (what the packed bytes encode)."""
        return self.packed_weight.shape[0] * self._ternary_cols

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

    def _refresh_if_stale(self):
        if self.weight is not None and self._packed_version != self.weight._version:
            self.refresh_packed()

    def freeze(self):
        """Drop the latent weight: the module becomes the packed inference form (in place)."""
        if self.weight is not None:
            self.refresh_packed()
            self.weight = None
        return self

    def dequantized_weight(self, dtype=torch.float32) -> torch.Tensor:
        """Dense ``[rows, cols]`` weight ``codes * scale`` (for inspection / export)."""
        self._refresh_if_stale()
        return dequantize_ternary(self.packed_weight, self.weight_scale, self._ternary_cols, dtype)

    def fake_quantized_weight(self) -> torch.Tensor:
        """QAT: the ternary weight ``codes * scale`` as a function of the latent weight, with the
        straight-through estimator: its value is the ternary weight, its gradient reaches the
        latent weight unchanged where ``|W| <= clip`` and is 0 beyond (twn / lat; absmean does
        not clip)."""
        w = self.weight
        codes, scale = self._ternarize(w)
        wq = codes.to(w.dtype) * scale.to(w.dtype).reshape(-1, 1)
        keep = (w.abs() <= self.clip) if self.method != "absmean" else torch.ones_like(w, dtype=torch.bool)
        return wq + (w - w.detach()) * keep

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        self._refresh_if_stale()
        super()._save_to_state_dict(destination, prefix, keep_vars)
