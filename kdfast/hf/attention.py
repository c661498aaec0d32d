"""The ``"kdfast"`` attention implementation for HuggingFace transformers (5.x).

    import kdfast.hf                      # registers once (idempotent)
    model = AutoModelForQuestionAnswering.from_config(cfg, attn_implementation="kdfast")

Registration adds one function to transformers' ``AttentionInterface`` (the
attention itself) and one to its ``AttentionMaskInterface`` (the mask
builder). Both are needed: for an attention name without a mask function,
transformers silently passes no padding mask at all.

Mask. For bidirectional (encoder) masks the mask function hands the attention
the 2-D ``[B, L]`` bool padding mask itself (1 = keep), not a 4-D
``[B, 1, L, L]`` bias, so :func:`kdfast.ops.attention` can skip padded keys
(variable-length processing: the mask is built once per forward, not per
layer; each layer's kernel call only lists the valid key indices, O(B * L)
integer work, and never touches padded keys).

Training note: with ``model.train()`` BERT passes its attention dropout
(0.1); on CPU tensors the kdfast kernel applies it itself (counter-based
Philox RNG seeded from torch's generator, mask regenerated in the backward,
padded keys still skipped), so training keeps the kernels; CUDA tensors run
SDPA's dropout until a GPU kernel draws masks. Any other pattern (causal, sliding, custom ``or/and`` mask functions)
falls back to transformers' SDPA mask, and the attention then runs
``F.scaled_dot_product_attention`` with the same gates applied.

Outputs equal ``attn_implementation="sdpa"`` (also at padded positions, which
attend to the valid keys like SDPA does). ``set_options(zero_padded_queries=True)``
makes padded query rows output 0 without computing them (FlashAttention
varlen behaviour; outputs at valid positions are unchanged, faster).

Head gates and pruned heads. If the attention module (e.g. ``BertSelfAttention``)
has attribute ``kdfast_head_gates`` (a tensor ``[H]``, or a callable such as a
:class:`kdfast.nn.HardConcreteGate` returning one) its values multiply each
head's output inside the op; ``kdfast_active_heads`` (bool ``[H]``) restricts
the computation to those heads. :func:`kdfast.compress.add_gates` sets them.
Without a gradient to the gates (eval, inference), heads whose gate is
exactly 0 are skipped as if inactive.

Observers (layer-distillation capture)::

    handle = kdfast.hf.attention.add_observer(fn)
    ...                                   # every kdfast attention call runs fn first
    handle.remove()

``fn(module, query, key, value, attention_mask)`` is called on every call of
the kdfast attention with the ``[B, H, L, D]`` query/key/value tensors the
attention uses (the very tensors, not copies; keep references only as long
as needed) and the mask it got: ``[B, L]`` bool (1 = keep), ``None`` (no
padding), or the 4-D SDPA mask in the fallback case. ``module.layer_idx``
tells the layer. With no observer registered this costs one empty-list test.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kdfast.ops.attention import attention

NAME = "kdfast"

_observers: list = []
_wants: dict = {}  # id(observer) -> wants(module): which of "q", "k", "v" it needs ("" none, None: not called)
_options = {"zero_padded_queries": False}
_registered = False


class ObserverHandle:
    """Returned by :func:`add_observer`; ``remove()`` unregisters the observer (idempotent)."""

    def __init__(self, fn):
        self.fn = fn

    def remove(self):
        for i, f in enumerate(_observers):
            if f is self.fn:
                del _observers[i]
                _wants.pop(id(f), None)
                return

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def add_observer(fn, wants=None) -> ObserverHandle:
    """Call ``fn(module, query, key, value, attention_mask)`` on every kdfast attention call.

    ``wants(module)`` (optional) says what ``fn`` needs from that module: a string naming some of
    "q", "k", "v" (the others are passed as None; "" passes none), or None (``fn`` is not called).
    The unpadded encoder (:mod:`kdfast.hf.unpad`) keeps its packed attention while observed and
    builds padded ``[B, H, L, D]`` copies only of the tensors an observer wants."""
    if not callable(fn):
        raise TypeError(f"add_observer: fn must be callable, got {type(fn).__name__}")
    if wants is not None and not callable(wants):
        raise TypeError(f"add_observer: wants must be callable or None, got {type(wants).__name__}")
    _observers.append(fn)
    if wants is not None:
        _wants[id(fn)] = wants
    return ObserverHandle(fn)


def observers_for(module) -> list:
    """``[(fn, needed)]``: the observers to call for ``module`` and which of "q", "k", "v" each needs."""
    out = []
    for fn in tuple(_observers):
        w = _wants.get(id(fn))
        need = "qkv" if w is None else w(module)
        if need is not None:
            out.append((fn, need))
    return out


def set_options(*, zero_padded_queries: bool | None = None) -> dict:
    """Set options of the HF attention; returns the previous values."""
    prev = dict(_options)
    if zero_padded_queries is not None:
        _options["zero_padded_queries"] = bool(zero_padded_queries)
    return prev


def _module_gates(module):
    g = getattr(module, "kdfast_head_gates", None)
    if g is not None and not isinstance(g, torch.Tensor):
        g = g()
    return g, getattr(module, "kdfast_active_heads", None)


def kdfast_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                             is_causal=None, zero_padded_queries=None, **kwargs):
    """transformers attention function: ``[B, H, L, D]`` q/k/v -> (``[B, L, H, D]`` output, None).

    ``zero_padded_queries`` (not passed by transformers) overrides the option of
    :func:`set_options` for this call (:mod:`kdfast.hf.unpad` passes True)."""
    zpq = _options["zero_padded_queries"] if zero_padded_queries is None else bool(zero_padded_queries)
    if _observers:
        for fn in tuple(_observers):
            fn(module, query, key, value, attention_mask)
    gates, active = _module_gates(module)
    if active is None and gates is not None and gates.dim() == 1 and not (gates.requires_grad and
                                                                          torch.is_grad_enabled()):
        # Heads whose gate is exactly 0 (hard-concrete gates in eval) are not computed at all.
        active = gates != 0
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", False)
    plain = attention_mask is None or attention_mask.dim() == 2
    if plain and not (is_causal and query.shape[2] > 1) and kwargs.get("position_bias") is None \
            and key.shape[1] == query.shape[1]:
        out = attention(query, key, value, mask=attention_mask, head_gates=gates, active_heads=active,
                        scale=scaling, dropout_p=dropout,
                        zero_padded_queries=zpq and attention_mask is not None
                        and query.shape[2] == key.shape[2])
        return out.transpose(1, 2), None
    # Fallback: patterns the op does not express (causal, 4-D custom masks, GQA).
    if key.shape[1] != query.shape[1]:
        rep = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(rep, 1), value.repeat_interleave(rep, 1)
    if attention_mask is not None and attention_mask.dim() == 2:
        attention_mask = attention_mask[:, None, None, :].bool()
    causal = bool(is_causal and attention_mask is None and query.shape[2] > 1)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                         scale=scaling, is_causal=causal)
    if active is not None:
        act = active if active.dtype == torch.bool else torch.zeros(
            out.shape[1], dtype=torch.bool, device=out.device).index_fill(0, active.long(), True)
        out = out * act.to(out.dtype)[None, :, None, None]
    if gates is not None:
        g = gates if gates.dim() == 2 else gates[None, :]
        out = out * g.to(out.dtype)[:, :, None, None]
    return out.transpose(1, 2).contiguous(), None


def kdfast_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                attention_mask=None, **kwargs):
    """transformers mask function: the 2-D ``[B, kv_length]`` bool padding mask for bidirectional
    attention (``None`` without padding), else transformers' SDPA 4-D mask."""
    from transformers import masking_utils as mu

    if mask_function is None or mask_function is mu.bidirectional_mask_function:
        if attention_mask is None:
            return None
        return attention_mask[:, -kv_length:].bool()
    return mu.sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                        kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                        **kwargs)


def register() -> None:
    """Register ``"kdfast"`` with transformers' attention and mask interfaces (idempotent)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, kdfast_attention_forward)
    AttentionMaskInterface.register(NAME, kdfast_mask)
    _registered = True
