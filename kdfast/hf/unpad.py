"""Unpadded encoder: BERT-family layers run on the valid tokens only, unpadded once per forward.

    import kdfast.hf
    model = AutoModelForQuestionAnswering.from_config(cfg, attn_implementation="kdfast")
    kdfast.hf.unpad_encoder(model)        # in place; returns a handle
    out = model(input_ids=ids, attention_mask=am)   # same start/end logits at valid positions
    kdfast.hf.remove_unpad(model)         # (or handle.remove()) back to the stock forward

With a padded batch (``attention_mask`` with zeros) the encoder gathers the
valid tokens of its input ``[B, L, hidden]`` once into a packed
``[T, hidden]`` tensor (T = number of valid tokens) and every layer runs its
token-wise parts on the packed tokens only: the query/key/value projections,
the attention output dense + dropout + LayerNorm, the intermediate dense +
activation and the output dense + dropout + LayerNorm. Padded tokens cost
no matmul work at all. The attention itself runs on the packed q/k/v
``[T, H, d]`` with cumulative sequence lengths
(:func:`kdfast.ops.attention.attention_varlen`, forward and backward, dropout
included): padded tokens are never materialised, training included. That
needs right-padded rows (each row's valid tokens one run) and CPU tensors (the
CPU kernels) or CUDA tensors with Triton available (its varlen kernels);
attention observers (:func:`kdfast.hf.capture`) get zero-padded ``[B, H, L, D]``
copies of only the q / k / v they want from the layers they watch, while the
attention stays packed. Otherwise the packed q/k/v are scattered into zero-filled
``[B, H, L, D]`` tensors and passed to the very function the registered
``"kdfast"`` attention runs (:func:`kdfast.hf.attention.kdfast_attention_forward`)
with the ``[B, L]`` padding mask and ``zero_padded_queries=True``, and its
output is gathered back to packed tokens. At the end the packed tokens are
scattered back to ``[B, L, hidden]``.

What the outputs contain:

- Valid positions: what the dense model computes (``attn_implementation=
  "sdpa"`` or ``"kdfast"``), up to float rounding (the matmuls see other row
  counts). So are QA start/end logits, pooled output (token 0 must be valid)
  and gradients (training works through it: gather/scatter are
  differentiable, dropout modules are called as usual).
- Padded positions of ``last_hidden_state`` are **zeros** (the dense model
  computes values there that no valid output depends on); a QA head then
  gives its output bias there. Mask them as usual (SQuAD post-processing
  only looks at context tokens).

What keeps working, because the modules themselves are called:
head gates, FFN gates and the hidden-dimension gate of
:func:`kdfast.compress.add_gates` (the FFN gate is a forward hook on
``intermediate``; the hidden gate hooks the residual writers and swaps in
gated LayerNorms, which act on the last dim of packed tokens alike), compacted layers of
:func:`kdfast.compress.compact` (uneven heads per layer, attention or FFN
removed entirely: ``_NoAttention`` / zero-width linears leave the output
bias, residual and LayerNorm), observers of the kdfast attention such as
:func:`kdfast.hf.capture` (they see ``[B, H, L, D]`` q/k/v that are zero at
padded positions, and the ``[B, L]`` mask).

``output_hidden_states=True`` (e.g. for layer distillation) works on the
packed path: entry 0 is the encoder input as usual, each layer's entry is
its output scattered to ``[B, L, hidden]`` with zeros at padded positions.

When the encoder runs its stock forward instead (same results, no skipping):
no padding (mask ``None``), a mask that is not the 2-D padding mask,
cross-attention inputs or a cache, or transformers recording outputs other
than hidden states / (with kdfast: empty) attentions. Forward hooks on
``BertLayer`` / ``BertSelfAttention`` modules themselves do not fire on the
packed path; hooks on the linears, ``intermediate``, ``output`` and
``attention.output`` do. Gradient checkpointing (``model.gradient_checkpointing_enable()``)
checkpoints each packed layer.

Supported: post-LayerNorm BERT-family encoders (BERT, RoBERTa, ELECTRA, ...):
``<encoder>.layer[i]`` with ``attention.self.{query,key,value}`` (``nn.Linear`` or
linear-like, such as ternary QAT's ``TernaryLinear``; or a compacted ``_NoAttention``), ``attention.output``, ``intermediate``,
``output``, run with ``attn_implementation="kdfast"``, encoder only (no
decoder / cross-attention). Other models raise ``ValueError``.
"""
from __future__ import annotations

import types

import torch
from torch import nn

from kdfast import backends
from kdfast.hf.attention import NAME, _module_gates, _observers, kdfast_attention_forward, observers_for
from kdfast.ops.attention import attention_varlen

_MARK = "_kdfast_unpadded"


def _find_encoder(model: nn.Module):
    from kdfast.compress.prune import encoder_layers
    layers = encoder_layers(model)  # raises ValueError for other layouts
    for m in model.modules():
        enc = getattr(m, "encoder", None)
        if enc is not None and getattr(enc, "layer", None) is layers:
            return m, enc
    raise ValueError("unpad_encoder: could not find the module holding the encoder")


def _linear_like(m) -> bool:
    """``nn.Linear``, or a module that maps ``[..., in_features]`` to ``[..., out_features]`` as one
    (e.g. :class:`kdfast.nn.TernaryLinear`: its per-token activation quantization acts on packed tokens alike)."""
    return isinstance(m, nn.Linear) or (isinstance(m, nn.Module) and isinstance(getattr(m, "in_features", None), int)
                                        and isinstance(getattr(m, "out_features", None), int))


def _check_layer(i, layer):
    from kdfast.compress.compact import _NoAttention
    if getattr(layer, "add_cross_attention", False) or getattr(layer, "is_decoder", False) \
            or hasattr(layer, "crossattention"):
        raise ValueError(f"unpad_encoder: layer {i} is a decoder / cross-attention layer; only encoders "
                         "(bidirectional self-attention) are supported")
    attn = getattr(layer, "attention", None)
    sa = getattr(attn, "self", None)
    if not isinstance(sa, _NoAttention):
        for name in ("query", "key", "value"):
            if not _linear_like(getattr(sa, name, None)):
                raise ValueError(f"unpad_encoder: layer {i}: attention.self.{name} is not a Linear (expected a "
                                 "BERT-family layer: attention.self.{query,key,value})")
        if not isinstance(getattr(sa, "attention_head_size", None), int):
            raise ValueError(f"unpad_encoder: layer {i}: attention.self has no attention_head_size")
    for path in ("attention.output", "intermediate", "output"):
        m = layer
        for p in path.split("."):
            m = getattr(m, p, None)
        if not isinstance(m, nn.Module):
            raise ValueError(f"unpad_encoder: layer {i} has no {path} module (expected a BERT-family layer)")
    if not hasattr(layer.attention.output, "LayerNorm"):
        raise ValueError(f"unpad_encoder: layer {i}: attention.output has no LayerNorm (only post-LayerNorm "
                         "BERT-family layers are supported)")


def _collector():
    """transformers' per-forward output collector (a dict, empty or None when nothing is recorded)."""
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # pragma: no cover - other transformers versions
        return None
    return _active_collector.get()


def _unsupported_recording(col) -> bool:
    # hidden_states are recorded below; "attentions" of the kdfast attention are None and an encoder
    # has no cross-attention (the stock forward records nothing for them either); anything else: let
    # the stock forward and its hooks run.
    ok = ("hidden_states", "_hidden_states_layers", "attentions", "cross_attentions")
    return bool(col) and any(k not in ok for k in col)


def _record_hidden(col, make):
    """What transformers' output hook on each layer does, for the packed path (``make()`` -> [B, L, hidden])."""
    hs = col["hidden_states"]
    sel = col.get("_hidden_states_layers")
    if sel is not None and len(hs) not in sel:
        hs.append(None)
    else:
        hs.append(make())


def _pad_heads(t, idx, B, L, d):
    """Packed ``[T, H*d]`` -> zero-padded ``[B, H, L, d]`` (a view of a ``[B, L, H, d]`` buffer)."""
    buf = t.new_zeros(B * L, t.shape[1]).index_copy_(0, idx, t)
    return buf.view(B, L, -1, d).transpose(1, 2)


def _packed_attention_on(device) -> bool:
    """Whether the attention runs on packed q/k/v on ``device``: CPU tensors (CPU kernels), CUDA tensors
    when the Triton varlen kernels can run (forward and backward); elsewhere q/k/v are re-padded."""
    if device.type == "cpu":
        return True
    return device.type == "cuda" and all(backends.plan(op, device).backend == "triton"
                                         for op in ("attention_varlen", "attention_varlen_bwd"))


def _attention_varlen(sa, x, cu, L, p, idx=None, mask=None, B=None):
    """Attention of packed tokens ``[T, hidden]`` on packed q/k/v ``[T, H, d]``. Nothing padded is
    built, except zero-padded ``[B, H, L, d]`` copies of the q / k / v that observers (``kdfast.hf.capture``)
    want from this layer, made once per tensor and handed to them; the attention stays packed."""
    d = sa.attention_head_size
    T = x.shape[0]
    flat = [lin(x) for lin in (sa.query, sa.key, sa.value)]
    if _observers:
        padded = {}
        for fn, need in observers_for(sa):
            for n in need:
                if n not in padded:
                    padded[n] = _pad_heads(flat["qkv".index(n)], idx, B, L, d)
            fn(sa, *(padded[n] if n in need else None for n in "qkv"), mask)
    q, k, v = (t.view(T, -1, d) for t in flat)
    gates, active = _module_gates(sa)
    if active is None and gates is not None and gates.dim() == 1 and not (gates.requires_grad and
                                                                          torch.is_grad_enabled()):
        active = gates != 0  # as kdfast_attention_forward: heads whose gate is exactly 0 are skipped
    out = attention_varlen(q, k, v, cu, cu, L, L, head_gates=gates, active_heads=active,
                           scale=getattr(sa, "scaling", None), dropout_p=p)
    return out.reshape(T, -1)


def _attention_packed(layer, x, idx, mask, B, L, cu=None):
    sa = layer.attention.self
    drop = getattr(sa, "dropout", None)
    p = drop.p if (getattr(sa, "training", False) and drop is not None) else 0.0
    if getattr(sa, "num_attention_heads", 1) == 0 or not hasattr(sa, "query"):
        ctx = x.new_zeros(x.shape[0], 0)  # attention removed by compaction: output bias + residual + LN remain
    elif cu is not None and _packed_attention_on(x.device) and not torch.compiler.is_compiling():
        ctx = _attention_varlen(sa, x, cu, L, p, idx, mask, B)
    else:  # other devices (or CUDA without Triton), torch.compile: re-padded q/k/v through the kdfast attention
        d = sa.attention_head_size
        q = _pad_heads(sa.query(x), idx, B, L, d)
        k = _pad_heads(sa.key(x), idx, B, L, d)
        v = _pad_heads(sa.value(x), idx, B, L, d)
        out, _ = kdfast_attention_forward(sa, q, k, v, mask, dropout=p, scaling=getattr(sa, "scaling", None),
                                          zero_padded_queries=True)
        ctx = out.reshape(B * L, -1).index_select(0, idx)  # [B, L, H, d] -> packed [T, H*d]
    return layer.attention.output(ctx, x)


def _layer_packed(layer, x, idx, mask, B, L, cu=None):
    a = _attention_packed(layer, x, idx, mask, B, L, cu)
    return layer.output(layer.intermediate(a), a)


def _unpadded_forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None,
                      encoder_attention_mask=None, past_key_values=None, use_cache=None, **kwargs):
    stock = type(self).forward
    if (attention_mask is None or attention_mask.dim() != 2 or attention_mask.dtype != torch.bool
            or hidden_states.dim() != 3 or encoder_hidden_states is not None or past_key_values is not None
            or _unsupported_recording(col := _collector())):
        return stock(self, hidden_states, attention_mask, encoder_hidden_states=encoder_hidden_states,
                     encoder_attention_mask=encoder_attention_mask, past_key_values=past_key_values,
                     use_cache=use_cache, **kwargs)
    from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions

    B, L, Hd = hidden_states.shape
    idx = attention_mask.reshape(-1).nonzero().squeeze(1)  # unpad once per forward
    x = hidden_states.reshape(B * L, Hd).index_select(0, idx)
    record = bool(col) and "hidden_states" in col
    # Packed q/k/v for the attention too when the valid tokens of each row are one run (right padding,
    # the usual case; then packed order = sequence order); otherwise re-padded q/k/v.
    # (The test reads the mask: no host sync on CPU tensors; on CUDA one more sync per forward, after
    # the one of nonzero() above.)
    cu = None
    if _packed_attention_on(hidden_states.device):
        lengths = attention_mask.sum(1)
        if torch.equal(attention_mask, torch.arange(L, device=attention_mask.device)[None, :] < lengths[:, None]):
            cu = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])

    def scatter(t):
        return t.new_zeros(B * L, t.shape[1]).index_copy_(0, idx, t).view(B, L, -1)
    if record and not col["hidden_states"] and col.get("_hidden_states_layers") is None:
        col["hidden_states"].append(hidden_states)  # the input of layer 0, as transformers records it
    for layer in self.layer:
        if getattr(layer, "gradient_checkpointing", False) and layer.training and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint
            x = checkpoint(_layer_packed, layer, x, idx, attention_mask, B, L, cu, use_reentrant=False)
        else:
            x = _layer_packed(layer, x, idx, attention_mask, B, L, cu)
        if record:
            _record_hidden(col, lambda: scatter(x))
    out = scatter(x)
    return BaseModelOutputWithPastAndCrossAttentions(last_hidden_state=out, past_key_values=None)


class UnpadHandle:
    """Returned by :func:`unpad_encoder`; ``remove()`` restores the stock encoder forward (idempotent)."""

    def __init__(self, model):
        self.model = model

    def remove(self):
        remove_unpad(self.model)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()
        return False


def unpad_encoder(model: nn.Module) -> UnpadHandle:
    """Make a BERT-family HF model's encoder skip padded tokens in every layer (in place).

    Args:
        model: a BERT-family transformers model (``BertModel``,
            ``BertForQuestionAnswering``, RoBERTa/ELECTRA variants, ...) built
            with ``attn_implementation="kdfast"``; gated (:func:`kdfast.compress.add_gates`)
            and compacted (:func:`kdfast.compress.compact`) models work too.

    Returns an :class:`UnpadHandle` (``.remove()`` or use as a context manager).
    Calling it twice is a no-op. Outputs at valid positions equal the stock
    model's; padded positions of the encoder output are zeros. Raises
    ``ValueError`` for models it does not support (see the module docstring).

    Equivalent PyTorch: the stock forward, with every token-wise module
    applied to ``hidden[mask]`` instead of ``hidden``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"unpad_encoder: model must be a torch.nn.Module, got {type(model).__name__}")
    _, enc = _find_encoder(model)
    cfg = getattr(model, "config", None)
    impl = getattr(cfg, "_attn_implementation", None)
    if impl != NAME:
        raise ValueError(f"unpad_encoder needs attn_implementation='kdfast' (the padding mask reaches the layers "
                         f"as [B, L] only then), but the model uses {impl!r}: build it with "
                         "attn_implementation='kdfast' after import kdfast.hf, or call "
                         "model.set_attn_implementation('kdfast')")
    if getattr(cfg, "is_decoder", False) or getattr(cfg, "add_cross_attention", False):
        raise ValueError("unpad_encoder: decoder / cross-attention models are not supported (encoders only)")
    for i, layer in enumerate(enc.layer):
        _check_layer(i, layer)
    if not getattr(enc, _MARK, False):
        enc.forward = types.MethodType(_unpadded_forward, enc)
        setattr(enc, _MARK, True)
    return UnpadHandle(model)


def remove_unpad(model: nn.Module) -> None:
    """Undo :func:`unpad_encoder`: the encoder runs its stock forward again (no-op if not unpadded)."""
    _, enc = _find_encoder(model)
    if getattr(enc, _MARK, False):
        del enc.forward
        delattr(enc, _MARK)


def is_unpadded(model: nn.Module) -> bool:
    """Whether :func:`unpad_encoder` is active on ``model``."""
    _, enc = _find_encoder(model)
    return bool(getattr(enc, _MARK, False))
