"""TernaryEmbedding: a drop-in ``nn.Embedding`` with 2-bit ternary rows (TernaryBERT's word embedding).

Two forms, as :class:`kdfast.nn.TernaryLinear`:

* QAT form (``qat=True``): a latent full-precision ``weight`` ``[V, D]``. In
  training mode the lookup reads the fake-quantized table (ternarize with a
  scale per row by default, straight-through estimator: the gradient of the
  looked-up rows reaches the latent weight, zeroed where ``|W| > clip``); in
  eval mode it reads the packed table made from the latent one (cached).
* Inference form (``qat=False``): only ``packed_weight`` (uint8
  ``[V, 16 * ceil(D / 64)]``, the layout of :mod:`kdfast.ops.ternary_quant`)
  and ``weight_scale`` (float32 ``[V]`` or ``[1]``): ~16x smaller than fp32.

Packed lookup decodes only the looked-up rows, in plain PyTorch (a gather of
packed bytes then :func:`kdfast.ops.dequantize_ternary`; no kernel: a lookup is
memory-bound and reads 1/16 of the fp32 bytes)::

    out = F.embedding(ids, dequantize_ternary(packed_weight, weight_scale, D))   # the same values, exactly

``padding_idx`` keeps ``nn.Embedding``'s meaning: no gradient reaches that row
and a freshly made QAT table has it zero (a zero row ternarizes to zero codes).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from kdfast.nn.ternary_weight import TernaryWeight
from kdfast.ops.ternary_quant import dequantize_ternary


def _positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class TernaryEmbedding(TernaryWeight):
    """``out = (codes * scale)[ids]`` with codes in {-1, 0, 1}, one scale per row (or per table).

    Args:
        num_embeddings, embedding_dim, padding_idx: as ``nn.Embedding`` (a negative
            ``padding_idx`` counts from the end).
        method: ``"twn"``, ``"absmean"`` or ``"lat"`` (see :func:`kdfast.ops.ternarize`).
        granularity: ``"row"`` (a scale per embedding row, the default) or ``"tensor"``.
        qat: keep a latent float weight for quantization-aware training.
        clip: weight clipping bound of twn/lat; the STE gradient is 0 beyond it.

    Input: integer ids of any shape; output ``[*ids.shape, embedding_dim]`` in the
    latent weight's dtype (QAT form) or ``weight_scale``'s (inference form: float32).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None, *,
                 method: str = "twn", granularity: str = "row", qat: bool = False, clip: float = 2.5,
                 device=None, dtype=None):
        super().__init__()
        self.num_embeddings = _positive_int("num_embeddings", num_embeddings)
        self.embedding_dim = _positive_int("embedding_dim", embedding_dim)
        if padding_idx is not None:
            if isinstance(padding_idx, bool) or not isinstance(padding_idx, int) or \
                    not -num_embeddings <= padding_idx < num_embeddings:
                raise ValueError(f"padding_idx must be None or an int in [-{num_embeddings}, {num_embeddings}), "
                                 f"got {padding_idx!r}")
            padding_idx = padding_idx % num_embeddings
        self.padding_idx = padding_idx
        self._setup_ternary(num_embeddings, embedding_dim, method=method, granularity=granularity, clip=clip,
                            device=device)
        if qat:
            w = torch.empty(num_embeddings, embedding_dim, device=device, dtype=dtype)
            nn.init.normal_(w)  # nn.Embedding's init
            if padding_idx is not None:
                w[padding_idx].zero_()
            self._set_latent(w)

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, *, method: str = "twn", granularity: str = "row",
                       qat: bool = False, clip: float = 2.5) -> "TernaryEmbedding":
        """Ternarize ``embedding`` (its table is copied; the original is left untouched)."""
        if not isinstance(embedding, nn.Embedding):
            raise TypeError(f"from_embedding expects an nn.Embedding, got {type(embedding).__name__}")
        for attr, default in (("max_norm", None), ("scale_grad_by_freq", False), ("sparse", False)):
            if getattr(embedding, attr) != default:
                raise ValueError(f"from_embedding: embedding.{attr}={getattr(embedding, attr)!r} is not supported "
                                 f"(only {attr}={default!r})")
        w = embedding.weight
        m = cls(embedding.num_embeddings, embedding.embedding_dim, embedding.padding_idx, method=method,
                granularity=granularity, qat=False, clip=clip, device=w.device)
        m._take_weight(w, qat)
        return m

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.weight is not None and self.training:
            return F.embedding(ids, self.fake_quantized_weight(), self.padding_idx)
        self._refresh_if_stale()
        return self.lookup(ids)

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """Packed lookup: gather the packed rows of ``ids``, decode only those (no autograd to the codes)."""
        if ids.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"ids must be an int32 or int64 tensor, got {ids.dtype}")
        flat = ids.reshape(-1)
        scale = self.weight_scale[flat] if self.granularity == "row" else self.weight_scale
        dtype = self.weight.dtype if self.weight is not None else self.weight_scale.dtype
        rows = dequantize_ternary(self.packed_weight[flat], scale, self.embedding_dim, dtype)
        return rows.reshape(*ids.shape, self.embedding_dim)

    def extra_repr(self):
        pad = "" if self.padding_idx is None else f", padding_idx={self.padding_idx}"
        return (f"{self.num_embeddings}, {self.embedding_dim}{pad}, method={self.method}, "
                f"granularity={self.granularity}, qat={self.qat}")
