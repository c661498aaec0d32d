"""The CoFi hidden-dimension gate: one gate over d_model shared by the embeddings and every layer.

With gate values ``z`` ``[D]`` (a hard-concrete sample in training, the
deterministic gate in eval; exact zeros mark pruned dims):

- every sublayer output added to the residual stream (``attention.output.dense``
  and ``output.dense``) is multiplied by ``z`` (forward hooks);
- every LayerNorm of the residual stream (embeddings, and each layer's two) is
  swapped for a :class:`GatedLayerNorm`: mean and variance over the kept dims
  only (``z != 0``), affine, then multiplied by ``z``, so pruned dims are
  exactly 0. The multiply after the LayerNorm is CoFi's ``hidden_z`` multiply
  of the embedding output and of each LayerNorm output; it is folded into the
  wrapper. The wrapper is an ``nn.LayerNorm`` subclass that holds the same
  weight/bias ``Parameter`` objects, so state-dict keys and optimizer
  references do not change; :func:`remove_hidden` swaps the originals back.

Pruned dims are therefore zero in the whole residual stream, every matrix
reading it can drop those input columns, and every matrix writing it can drop
those output rows; the kept values of ``z`` fold into the output rows and the
LayerNorm affine (:func:`compact_hidden`), which makes compaction exact.
The gate is sampled once per forward (a pre-hook on the embeddings module), so
all layers see the same ``z``. With all gates at exactly 1 the gated model
computes what the ungated model computes, bit for bit.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class HiddenMask:
    """The current hidden-gate values shared by all hooks: ``(z [D], kept index [d], all_kept)``."""

    def __init__(self, gate):
        self.gate = gate
        self.current = None

    def refresh(self):
        z = self.gate()
        idx = torch.nonzero(z != 0).flatten()
        self.current = (z, idx, idx.numel() == z.numel())
        return self.current

    def get(self):
        return self.refresh() if self.current is None else self.current


class GatedLayerNorm(nn.LayerNorm):
    """LayerNorm over the dims whose hidden gate is non-zero, times the gate; 0 in pruned dims.

    ``x`` ``[..., D]`` any float dtype -> same shape and dtype. Equivalent to::

        k = z != 0
        out = zeros_like(x); out[..., k] = F.layer_norm(x[..., k], (k.sum(),), w[k], b[k], eps) * z[k]
    """

    def __init__(self, ln: nn.LayerNorm, mask: HiddenMask):
        nn.Module.__init__(self)
        if len(ln.normalized_shape) != 1:
            raise ValueError(f"hidden gate: LayerNorm over {ln.normalized_shape} (expected one dim)")
        self.normalized_shape = tuple(ln.normalized_shape)
        self.eps = ln.eps
        self.elementwise_affine = ln.elementwise_affine
        self.weight = ln.weight
        self.bias = ln.bias
        self._kdfast_mask = mask
        self._kdfast_orig = (ln,)  # a tuple: not registered as a submodule

    def forward(self, x):
        z, idx, all_kept = self._kdfast_mask.get()
        if all_kept:
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps) * z.to(x.dtype)
        out = x.new_zeros(x.shape)
        if idx.numel() == 0:
            return out
        w = None if self.weight is None else self.weight[idx]
        b = None if self.bias is None else self.bias[idx]
        yk = F.layer_norm(x.index_select(-1, idx), (idx.numel(),), w, b, self.eps) * z[idx].to(x.dtype)
        return out.index_copy(x.dim() - 1, idx, yk)


def _set_child(parent, name, module):
    setattr(parent, name, module)


def _residual_writers(layer):
    return [layer.attention.output.dense, layer.output.dense]


def _layernorm_sites(base, layers):
    """(parent, attribute name) of each residual-stream LayerNorm."""
    sites = [(base.embeddings, "LayerNorm")]
    for layer in layers:
        sites += [(layer.attention.output, "LayerNorm"), (layer.output, "LayerNorm")]
    return sites


def install_hidden(base, layers, gate) -> tuple[HiddenMask, list]:
    """Apply ``gate`` over d_model to the base model; returns the mask state and the hook handles."""
    mask = HiddenMask(gate)
    for parent, name in _layernorm_sites(base, layers):
        ln = getattr(parent, name)
        if not isinstance(ln, nn.LayerNorm):
            raise ValueError(f"hidden gate: expected an nn.LayerNorm at {type(parent).__name__}.{name}")
        _set_child(parent, name, GatedLayerNorm(ln, mask))

    def sample_hook(module, args):  # one gate sample per forward, shared by every layer
        mask.refresh()

    handles = [base.embeddings.register_forward_pre_hook(sample_hook)]

    def writer_hook(module, args, output):
        return output * mask.get()[0].to(output.dtype)

    for layer in layers:
        handles += [lin.register_forward_hook(writer_hook) for lin in _residual_writers(layer)]
    return mask, handles


def remove_hidden(base, layers) -> None:
    """Swap the original LayerNorms back (the hooks are removed by the caller)."""
    for parent, name in _layernorm_sites(base, layers):
        ln = getattr(parent, name)
        if isinstance(ln, GatedLayerNorm):
            _set_child(parent, name, ln._kdfast_orig[0])


# --- compaction ----------------------------------------------------------------------------------------------

# Heads of task models that read the sequence output (their input columns follow the hidden dim), and
# children whose input is the pooled output (unchanged: the pooler keeps its output width).
_SEQUENCE_HEADS = {"qa_outputs"}


def _head_readers(model, base):
    """Linears outside the base model that read the final hidden states (raises on unknown heads)."""
    if model is base:
        return []
    readers = []
    for name, child in model.named_children():
        if child is base or not any(True for _ in child.parameters()):
            continue
        token_head = name == "classifier" and type(model).__name__.endswith("ForTokenClassification")
        if name in _SEQUENCE_HEADS or token_head:
            if not isinstance(child, nn.Linear):
                raise ValueError(f"hidden compaction: head {name!r} is not an nn.Linear")
            readers.append(child)
        elif name == "classifier" and getattr(base, "pooler", None) is not None:
            continue  # reads the pooled output, whose width is kept
        else:
            raise ValueError(f"hidden compaction does not know the head {name!r} of {type(model).__name__} "
                             "(supported: question answering, token / sequence classification, the base model)")
    return readers


def _sites(model, base, layers):
    """The modules touching the hidden dim: embeddings, LayerNorms, input-column and output-row linears."""
    D = base.embeddings.LayerNorm.normalized_shape[0]
    embs = [m for m in base.embeddings.children() if isinstance(m, nn.Embedding)]
    for e in embs:
        if e.embedding_dim != D:
            raise ValueError(f"hidden compaction: embedding of width {e.embedding_dim} != hidden size {D}")
    lns = [getattr(p, n) for p, n in _layernorm_sites(base, layers)]
    cols, rows = [], []
    for layer in layers:
        sa = layer.attention.self
        if hasattr(sa, "query"):
            cols += [sa.query, sa.key, sa.value]
        cols.append(layer.intermediate.dense)
        rows += _residual_writers(layer)
    pooler = getattr(base, "pooler", None)
    if pooler is not None:
        cols.append(pooler.dense)
    cols += _head_readers(model, base)
    return D, embs, lns, cols, rows


def _param(t):
    return nn.Parameter(t.contiguous())


def check_hidden(model, base, layers, z) -> torch.Tensor:
    """Validate a hidden keep mask / gate values for :func:`compact_hidden`; returns it as float32 CPU."""
    D = _sites(model, base, layers)[0]
    z = torch.as_tensor(z).detach().float().cpu()
    if tuple(z.shape) != (D,):
        raise ValueError(f"hidden must have {D} entries, got shape {tuple(z.shape)}")
    if not bool((z != 0).any()):
        raise ValueError("hidden compaction: every hidden dim is pruned")
    return z


@torch.no_grad()
def compact_hidden(model, base, layers, z) -> list:
    """Keep the hidden dims where ``z != 0`` (``z`` ``[D]``), folding kept values into rows and LayerNorms.

    Returns the kept indices (in the model's current hidden coordinates).
    """
    z = check_hidden(model, base, layers, z)
    D, embs, lns, cols, rows = _sites(model, base, layers)
    idx = torch.nonzero(z != 0).flatten()
    s = z[idx]
    d = idx.numel()
    for e in embs:
        e.weight = _param(e.weight[:, idx.to(e.weight.device)])
        e.embedding_dim = d
    for ln in lns:
        i = idx.to(ln.weight.device)
        ln.weight = _param(ln.weight[i] * s.to(ln.weight))
        if ln.bias is not None:
            ln.bias = _param(ln.bias[i] * s.to(ln.bias))
        ln.normalized_shape = (d,)
    for lin in cols:
        lin.weight = _param(lin.weight[:, idx.to(lin.weight.device)])
        lin.in_features = d
    for lin in rows:
        i = idx.to(lin.weight.device)
        lin.weight = _param(lin.weight[i] * s.to(lin.weight)[:, None])
        if lin.bias is not None:
            lin.bias = _param(lin.bias[i] * s.to(lin.bias))
        lin.out_features = d
    model.config.hidden_size = d
    return idx.tolist()


@torch.no_grad()
def resize_hidden(model, base, layers, d: int) -> None:
    """Give every module touching the hidden dim width ``d`` (new weights uninitialised; for loading)."""
    D, embs, lns, cols, rows = _sites(model, base, layers)

    def empty(p, *shape):
        return nn.Parameter(torch.empty(*shape, device=p.device, dtype=p.dtype))

    for e in embs:
        e.weight = empty(e.weight, e.num_embeddings, d)
        e.embedding_dim = d
    for ln in lns:
        ln.weight = empty(ln.weight, d)
        if ln.bias is not None:
            ln.bias = empty(ln.bias, d)
        ln.normalized_shape = (d,)
    for lin in cols:
        lin.weight = empty(lin.weight, lin.out_features, d)
        lin.in_features = d
    for lin in rows:
        lin.weight = empty(lin.weight, d, lin.in_features)
        if lin.bias is not None:
            lin.bias = empty(lin.bias, d)
        lin.out_features = d
    model.config.hidden_size = d
