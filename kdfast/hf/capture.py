"""Capture the q, k, v each attention layer used, for layer distillation with fast attention.

    from kdfast.hf.capture import capture
    model = BertForQuestionAnswering.from_pretrained(..., attn_implementation="kdfast")
    with capture(model) as cap:
        out = model(**batch)
    q, k, v = cap.layers[0]          # [B, H, L, D] each, layer 0 = the first encoder layer
    cap.mask                         # [B, L] bool padding mask the attention saw (None: no padding)

The model must run with ``attn_implementation="kdfast"`` (registered by
``import kdfast.hf``); the capture is an observer of that attention
(:func:`kdfast.hf.attention.add_observer`), so ``output_attentions`` stays
off and no L x L map is ever built. It keeps references to the very tensors
the attention received, no copies: for the student they carry the autograd
graph back to the query/key/value projections; for a teacher run under
``torch.no_grad()`` they are plain tensors. Entering the context again (next
training step) drops the previous step's tensors; so does :meth:`clear`.

A capture only records calls from modules inside ``model`` (pass ``None`` to
record every kdfast attention call), so a student and a teacher can be
captured at the same time.

For a teacher run under no_grad, every reference kept is memory that would
otherwise be freed after its layer: ``layers=`` (0-based attention layers) and
``keep=`` (which of "q", "k", "v") keep only what the losses use; the other
entries are None (``cap.layers`` keeps one position per layer).
``kdfast.nn.LayerKD.capture_args("teacher")`` gives both for a LayerKD
(BERT-base teacher, 4 of 12 layers, q and k, B=8, L=384: 75 MB kept instead of
340 MB).
"""
from __future__ import annotations

import torch

from kdfast.hf import attention as _attention


class LayerCapture:
    """Per-layer (q, k, v) of the last forward run inside the context."""

    def __init__(self, model: torch.nn.Module | None = None, *, layers=None, keep: str = "qkv"):
        if model is not None and not isinstance(model, torch.nn.Module):
            raise TypeError(f"capture: model must be a torch.nn.Module or None, got {type(model).__name__}")
        if not isinstance(keep, str) or not keep or set(keep) - set("qkv"):
            raise ValueError(f"capture: keep must name some of 'q', 'k', 'v' (e.g. 'qk'), got {keep!r}")
        if layers is not None:
            try:
                layers = frozenset(int(i) for i in layers)
            except (TypeError, ValueError):
                raise TypeError(f"capture: layers must be None or an iterable of 0-based layer indices, got "
                                f"{layers!r}") from None
            if any(i < 0 for i in layers):
                raise ValueError(f"capture: layer indices are 0-based and >= 0, got {sorted(layers)}")
        self.model = model
        self.keep_layers = layers
        self.keep = keep
        self._by_layer: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._order: dict[int, int] = {}  # id(module) -> layer index, for modules without layer_idx
        self._modules = None
        self._handle = None
        self.mask: torch.Tensor | None = None
        self.scales: dict[int, float | None] = {}

    # -- recording -------------------------------------------------------
    def _index(self, module) -> int:
        idx = getattr(module, "layer_idx", None)
        if idx is None:
            idx = self._order.setdefault(id(module), len(self._order))
        return int(idx)

    def _wants(self, module):
        """What :meth:`_observe` needs from ``module`` (see ``kdfast.hf.attention.add_observer``)."""
        if self._modules is not None and id(module) not in self._modules:
            return None
        if self.keep_layers is not None and self._index(module) not in self.keep_layers:
            return ""
        return self.keep

    def _observe(self, module, query, key, value, attention_mask):
        if self._modules is not None and id(module) not in self._modules:
            return
        idx = self._index(module)
        if self.keep_layers is not None and idx not in self.keep_layers:
            self._by_layer[idx] = None  # seen, not kept: the position stays
        else:
            self._by_layer[idx] = tuple(x if n in self.keep else None for n, x in zip("qkv", (query, key, value)))
        self.scales[idx] = getattr(module, "scaling", None)
        if attention_mask is not None and attention_mask.dim() == 2:
            self.mask = attention_mask
        elif attention_mask is None:
            self.mask = None
        else:  # 4-D mask (fallback path): keys kept by any query row of the first head
            self.mask = attention_mask[:, 0].bool().any(1) if attention_mask.dtype == torch.bool else \
                (attention_mask[:, 0] > torch.finfo(attention_mask.dtype).min / 2).any(1)

    def clear(self):
        """Drop the references to the recorded tensors."""
        self._by_layer.clear()
        self.scales.clear()
        self.mask = None

    @property
    def layers(self) -> list:
        """(q, k, v) ``[B, H, L, D]`` per attention layer, in layer order; None for a layer outside
        ``layers=`` and for a tensor outside ``keep=``."""
        return [self._by_layer[i] for i in sorted(self._by_layer)]

    def __len__(self):
        return len(self._by_layer)

    # -- context ---------------------------------------------------------
    def __enter__(self):
        if self._handle is not None:
            raise RuntimeError("capture: this capture is already active")
        self.clear()
        self._order.clear()
        self._modules = None if self.model is None else {id(m) for m in self.model.modules()}
        self._handle = _attention.add_observer(self._observe, wants=self._wants)
        return self

    def __exit__(self, *exc):
        self._handle.remove()
        self._handle = None
        return False


def capture(model: torch.nn.Module | None = None, *, layers=None, keep: str = "qkv") -> LayerCapture:
    """Context manager recording the q, k, v of every kdfast attention layer of ``model``.

    Returns a :class:`LayerCapture`; after the forward, ``cap.layers[i]`` is
    ``(q, k, v)`` of attention layer ``i`` (``[B, H, L, D]``, the tensors the
    attention used) and ``cap.mask`` the ``[B, L]`` bool padding mask (or None).
    Feed ``cap.layers`` to :class:`kdfast.nn.LayerKD` as ``student_qkv`` / ``teacher_qkv``.

    ``layers``: 0-based indices of the layers to keep (default all; the others give None);
    ``keep``: which of "q", "k", "v" to keep (the others are None). See
    ``LayerKD.capture_args``.
    """
    return LayerCapture(model, layers=layers, keep=keep)
