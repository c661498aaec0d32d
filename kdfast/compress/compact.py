"""Compaction: physically remove pruned heads, FFN units and hidden dims from a BERT-family model.

    kdfast.compress.compact(model)                       # from the model's gates (eval values)
    kdfast.compress.compact(model, heads=[...], ffn=[...], hidden=...)  # or from explicit keep masks

Each layer keeps its own number of heads and FFN width. Gate values of the
kept units are folded into the output projections (``attention.output.dense``
columns per head, ``output.dense`` columns per FFN unit), so the compacted
model computes exactly what the gated model computes in eval mode (hard,
deterministic gates). A layer whose heads are all pruned gets an empty
attention (``_NoAttention``: no q/k/v projections and no attention at all)
and an output projection with zero input features, which leaves the output
bias, the residual and the LayerNorm: what the gated model computes there.
An FFN with no unit left becomes zero-width linears (no matmul work) with the
same effect.

With a hidden gate (or an explicit ``hidden`` mask), the pruned hidden dims
are removed from the embeddings, the residual LayerNorms (kept gate values
folded into their affine), every q/k/v and FFN input, the residual writers'
output rows (gate values folded in), the pooler's input and the task head's
input (see :func:`kdfast.compress.hidden.compact_hidden`). ``config.hidden_size``
becomes the kept width; the attention head size stays what it was.

The per-layer shapes are written to ``model.config.kdfast_pruning``
(``{"num_heads": [...], "ffn_dims": [...], "kept_heads": [[...], ...]}``, plus
``"hidden_size"``, ``"full_hidden_size"`` and ``"kept_hidden"`` once the hidden
dim is pruned) so :func:`kdfast.compress.load_pruned` can rebuild the model.
"""
from __future__ import annotations

import torch
from torch import nn

from kdfast.compress import hidden as _hidden
from kdfast.compress.prune import base_model, encoder_layers, remove_gates

CONFIG_KEY = "kdfast_pruning"


class _NoAttention(nn.Module):
    """Self-attention with all heads pruned: outputs a ``[..., 0]`` tensor (no work)."""

    def __init__(self, layer_idx=None):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_attention_heads = 0

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states.new_zeros(*hidden_states.shape[:-1], 0), None


def _linear(in_f, out_f, like: nn.Linear, bias=True):
    w = like.weight
    lin = nn.Linear(1, 1, bias=bias, device=w.device, dtype=w.dtype)
    lin.weight = nn.Parameter(torch.empty(out_f, in_f, device=w.device, dtype=w.dtype))
    if bias:
        lin.bias = nn.Parameter(torch.empty(out_f, device=w.device, dtype=w.dtype))
    lin.in_features, lin.out_features = in_f, out_f
    return lin


def resize_layer(layer: nn.Module, num_heads: int, ffn_dim: int) -> None:
    """Give ``layer`` ``num_heads`` heads and FFN width ``ffn_dim`` (new weights uninitialised)."""
    attn = layer.attention
    sa = attn.self
    dense = attn.output.dense
    if num_heads == 0:
        if not isinstance(sa, _NoAttention):
            attn.self = _NoAttention(getattr(sa, "layer_idx", None))
    else:
        if isinstance(sa, _NoAttention):
            raise ValueError("cannot re-grow heads of a layer whose attention was removed")
        dh = sa.attention_head_size
        width = num_heads * dh
        for name in ("query", "key", "value"):
            old = getattr(sa, name)
            setattr(sa, name, _linear(old.in_features, width, old))
        sa.num_attention_heads = num_heads
        sa.all_head_size = width
    width = 0 if num_heads == 0 else num_heads * attn.self.attention_head_size
    attn.output.dense = _linear(width, dense.out_features, dense)
    inter, out = layer.intermediate.dense, layer.output.dense
    layer.intermediate.dense = _linear(inter.in_features, ffn_dim, inter)
    layer.output.dense = _linear(ffn_dim, out.out_features, out)


_HIDDEN_KEYS = ("hidden_size", "full_hidden_size", "kept_hidden")


def apply_structure(model: nn.Module, structure: dict) -> None:
    """Resize every layer to ``structure`` (``{"num_heads": [...], "ffn_dims": [...]}``, optional ``"hidden_size"``)."""
    layers = encoder_layers(model)
    nh, fd = structure["num_heads"], structure["ffn_dims"]
    if len(nh) != len(layers) or len(fd) != len(layers):
        raise ValueError(f"structure has {len(nh)}/{len(fd)} layers, model has {len(layers)}")
    for layer, h, f in zip(layers, nh, fd):
        resize_layer(layer, int(h), int(f))
    d = structure.get("hidden_size")
    if d is not None:
        base = base_model(model)
        if int(d) != base.embeddings.LayerNorm.normalized_shape[0]:
            _hidden.resize_hidden(model, base, layers, int(d))
    model.config.update({CONFIG_KEY: {k: (list(v) if isinstance(v, (list, tuple)) else v)
                                      for k, v in structure.items()}})


def _values(mask_or_values, n, what, i):
    if mask_or_values is None:
        return torch.ones(n)
    x = torch.as_tensor(mask_or_values).detach().float().cpu()
    if tuple(x.shape) != (n,):
        raise ValueError(f"{what}[{i}] must have {n} entries, got shape {tuple(x.shape)}")
    return x


@torch.no_grad()
def compact(model: nn.Module, *, heads=None, ffn=None, hidden=None) -> dict:
    """Remove pruned heads / FFN units in place; returns the structure written to the config.

    Args:
        model: BERT-family HF model. With ``model.kdfast_gates`` (from
            :func:`add_gates`) and no explicit masks, the gates' eval values
            decide (value 0 = pruned, others are folded into the weights) and
            the gates are removed afterwards.
        heads: optional list (one per layer) of ``[H]`` keep masks or gate values.
        ffn: optional list (one per layer) of ``[F]`` keep masks or gate values.
        hidden: optional ``[D]`` keep mask or gate values over the hidden dim
            (values are folded like the gate values of the gated model).
    """
    layers = encoder_layers(model)
    gates = getattr(model, "kdfast_gates", None)
    n = len(layers)
    if heads is not None and len(heads) != n or ffn is not None and len(ffn) != n:
        raise ValueError(f"heads and ffn must have one entry per layer ({n})")
    hv, fv, zv = [], [], hidden
    if gates is not None and heads is None and ffn is None and hidden is None:
        was = gates.training
        gates.eval()
        for i in range(n):
            h = gates.head_values(i)
            f = gates.ffn_values(i)
            hv.append(None if h is None else h.detach().float().cpu())
            fv.append(None if f is None else f.detach().float().cpu())
        z = gates.hidden_values()
        zv = None if z is None else z.detach().float().cpu()
        gates.train(was)
    else:
        hv = [None] * n if heads is None else list(heads)
        fv = [None] * n if ffn is None else list(ffn)
    if gates is not None:
        remove_gates(model)  # restores the plain LayerNorms before they are resized
    if zv is not None:  # fail before anything is modified
        zv = _hidden.check_hidden(model, base_model(model), layers, zv)
    prev = dict(getattr(model.config, CONFIG_KEY, None) or {})
    structure = {"num_heads": [], "ffn_dims": [], "kept_heads": []}
    for i, layer in enumerate(layers):
        sa = layer.attention.self
        if isinstance(sa, _NoAttention):
            H, dh = 0, 0
        else:
            dh = sa.attention_head_size
            H = sa.query.out_features // dh
        F_ = layer.intermediate.dense.out_features
        h = _values(hv[i], H, "heads", i) if H else torch.ones(0)
        f = _values(fv[i], F_, "ffn", i)
        keep_h = torch.nonzero(h != 0).flatten()
        keep_f = torch.nonzero(f != 0).flatten()
        # Gather the kept weights before resizing (the old modules are replaced).
        if H:
            rows = (keep_h[:, None] * dh + torch.arange(dh)[None, :]).flatten()
            qkv = {nm: (getattr(sa, nm).weight[rows].clone(), getattr(sa, nm).bias[rows].clone())
                   for nm in ("query", "key", "value")}
            col_scale = h[keep_h].repeat_interleave(dh)
            o_w = layer.attention.output.dense.weight[:, rows] * col_scale.to(layer.attention.output.dense.weight)
        o_b = layer.attention.output.dense.bias.clone()
        i_w = layer.intermediate.dense.weight[keep_f].clone()
        i_b = layer.intermediate.dense.bias[keep_f].clone()
        d_w = layer.output.dense.weight[:, keep_f] * f[keep_f].to(layer.output.dense.weight)
        d_b = layer.output.dense.bias.clone()
        resize_layer(layer, len(keep_h), len(keep_f))
        if len(keep_h):
            for nm, (w, b) in qkv.items():
                getattr(layer.attention.self, nm).weight.copy_(w)
                getattr(layer.attention.self, nm).bias.copy_(b)
            layer.attention.output.dense.weight.copy_(o_w)
        layer.attention.output.dense.bias.copy_(o_b)
        layer.intermediate.dense.weight.copy_(i_w)
        layer.intermediate.dense.bias.copy_(i_b)
        layer.output.dense.weight.copy_(d_w)
        layer.output.dense.bias.copy_(d_b)
        structure["num_heads"].append(len(keep_h))
        structure["ffn_dims"].append(len(keep_f))
        structure["kept_heads"].append(keep_h.tolist())
    full = prev.get("full_hidden_size", model.config.hidden_size)
    kept = prev.get("kept_hidden", list(range(full)))
    if zv is not None:
        keep = _hidden.compact_hidden(model, base_model(model), layers, zv)
        kept = [kept[j] for j in keep]
    if len(kept) != full:
        structure.update({"hidden_size": len(kept), "full_hidden_size": full, "kept_hidden": kept})
    model.config.update({CONFIG_KEY: structure})
    return structure
