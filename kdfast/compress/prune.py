"""Structured-pruning gates for BERT-family HuggingFace models.

    import kdfast.hf                                   # the gates act inside the kdfast attention
    model = AutoModelForQuestionAnswering.from_config(cfg, attn_implementation="kdfast")
    gates = kdfast.compress.add_gates(model, heads=True, ffn=True)
    ctl = kdfast.nn.SparsityController(target=0.6, warmup_steps=2000)
    ...
    loss = task_or_kd_loss + ctl.penalty(gates.expected_sparsity(), step)
    ...
    model.eval(); kdfast.compress.compact(model)         # physically removes pruned heads / units

Gates (one :class:`~kdfast.nn.HardConcreteGate` each, held in
``model.kdfast_gates``, so they are parameters of the model):

- ``heads``: one per attention head per layer, applied inside
  :func:`kdfast.ops.attention` (the head gate is fused into the output write),
- ``ffn``: one per FFN intermediate unit per layer (scales the intermediate
  activations),
- ``layers``: one for each whole attention and FFN sublayer per layer
  (CoFi ``mha_z`` / ``ffn_z``), multiplying the finer gates.

The hidden-dimension gate of CoFi is not implemented.

Works on models whose encoder is ``<model>.<base>.encoder.layer[i]`` with
``attention.self.{query,key,value}``, ``attention.output.dense``,
``intermediate.dense`` and ``output.dense`` (BERT, RoBERTa, ELECTRA, ...).
The model must use ``attn_implementation="kdfast"`` for head gates to act.
"""
from __future__ import annotations

import torch
from torch import nn

from kdfast.nn.gates import HardConcreteGate


def encoder_layers(model: nn.Module):
    """The list of transformer layers of a BERT-family model (raises if not found)."""
    for m in model.modules():
        layers = getattr(getattr(m, "encoder", None), "layer", None)
        if isinstance(layers, nn.ModuleList) and len(layers) and hasattr(layers[0], "attention") \
                and hasattr(layers[0], "intermediate"):
            return layers
    raise ValueError("model has no BERT-family encoder (expected .encoder.layer[i].attention/.intermediate)")


def _head_dim(sa):
    return sa.attention_head_size


def _n_heads(sa):
    return sa.query.out_features // sa.attention_head_size


class PruningGates(nn.Module):
    """The gates of one model, with expected size and sparsity reports."""

    def __init__(self, layers, heads, ffn, layer_gates, init_keep):
        super().__init__()
        self.head = nn.ModuleList()
        self.ffn = nn.ModuleList()
        self.mha_layer = nn.ModuleList()
        self.ffn_layer = nn.ModuleList()
        self.has = {"heads": heads, "ffn": ffn, "layers": layer_gates}
        self.shapes = []
        for layer in layers:
            sa = layer.attention.self
            H, dh = _n_heads(sa), _head_dim(sa)
            d_model = sa.query.in_features
            F_ = layer.intermediate.dense.out_features
            self.shapes.append((H, dh, d_model, F_))
            if heads:
                self.head.append(HardConcreteGate(H, init_keep=init_keep))
            if ffn:
                self.ffn.append(HardConcreteGate(F_, init_keep=init_keep))
            if layer_gates:
                self.mha_layer.append(HardConcreteGate(1, init_keep=init_keep))
                self.ffn_layer.append(HardConcreteGate(1, init_keep=init_keep))

    # --- gate values --------------------------------------------------------
    def head_values(self, i):
        z = self.head[i]() if self.has["heads"] else None
        if self.has["layers"]:
            zl = self.mha_layer[i]()
            z = zl.expand(self.shapes[i][0]) if z is None else z * zl
        return z

    def ffn_values(self, i):
        z = self.ffn[i]() if self.has["ffn"] else None
        if self.has["layers"]:
            zl = self.ffn_layer[i]()
            z = zl.expand(self.shapes[i][3]) if z is None else z * zl
        return z

    # --- expected size ------------------------------------------------------
    def _expected_units(self, i):
        H, dh, d, F_ = self.shapes[i]
        eh = self.head[i].prob_nonzero().sum() if self.has["heads"] else torch.tensor(float(H))
        ef = self.ffn[i].prob_nonzero().sum() if self.has["ffn"] else torch.tensor(float(F_))
        if self.has["layers"]:
            eh = eh * self.mha_layer[i].prob_nonzero()[0]
            ef = ef * self.ffn_layer[i].prob_nonzero()[0]
        return eh, ef

    def full_params(self):
        """Prunable parameters of the unpruned encoder (q, k, v, o weights; FFN in/out weights)."""
        return sum(4 * d * H * dh + 2 * d * F_ for H, dh, d, F_ in self.shapes)

    def expected_params(self):
        """Expected remaining prunable parameters (differentiable scalar)."""
        total = 0.0
        for i, (H, dh, d, F_) in enumerate(self.shapes):
            eh, ef = self._expected_units(i)
            total = total + 4 * d * dh * eh + 2 * d * ef
        return total

    def expected_sparsity(self):
        """1 - expected_params / full_params (differentiable scalar): feed it to SparsityController.penalty."""
        return 1.0 - self.expected_params() / self.full_params()

    @torch.no_grad()
    def report(self):
        """Per layer: expected heads, FFN units and parameters, and the hard (eval) counts."""
        rows = []
        for i, (H, dh, d, F_) in enumerate(self.shapes):
            eh, ef = self._expected_units(i)
            hv = self._eval(self.head_values, i)
            fv = self._eval(self.ffn_values, i)
            kh = int((hv > 0).sum()) if hv is not None else H
            kf = int((fv > 0).sum()) if fv is not None else F_
            rows.append({"layer": i, "heads": H, "expected_heads": float(eh), "kept_heads": kh,
                         "ffn": F_, "expected_ffn": float(ef), "kept_ffn": kf,
                         "expected_params": float(4 * d * dh * eh + 2 * d * ef),
                         "kept_params": 4 * d * dh * kh + 2 * d * kf})
        return rows

    def _eval(self, fn, i):
        was = self.training
        self.eval()
        try:
            return fn(i)
        finally:
            self.train(was)


class _HeadGateFn:
    """Callable stored on the attention module: returns this layer's head gates."""

    def __init__(self, gates, i):
        self.gates, self.i = gates, i

    def __call__(self):
        return self.gates.head_values(self.i)


def _ffn_hook(gates, i):
    def hook(module, args, output):
        z = gates.ffn_values(i)
        return output * z.to(output.dtype)
    return hook


def add_gates(model: nn.Module, *, heads: bool = True, ffn: bool = True, layers: bool = False,
              init_keep: float = 0.9) -> PruningGates:
    """Add L0 gates to a BERT-family HF model in place; returns the :class:`PruningGates`.

    The gates become ``model.kdfast_gates`` (parameters of the model). Head
    gates act through the ``"kdfast"`` attention (``import kdfast.hf`` and
    ``attn_implementation="kdfast"``); FFN gates through a forward hook on
    each ``intermediate`` module. Call again after :func:`remove_gates` only.
    """
    if hasattr(model, "kdfast_gates"):
        raise ValueError("model already has kdfast gates (remove_gates(model) first)")
    if not (heads or ffn or layers):
        raise ValueError("add_gates: enable at least one of heads, ffn, layers")
    enc = encoder_layers(model)
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if (heads or layers) and impl != "kdfast":
        raise ValueError(f"head gates act inside the kdfast attention, but the model uses attn_implementation="
                         f"{impl!r}; build it with attn_implementation='kdfast' (after import kdfast.hf) or call "
                         "model.set_attn_implementation('kdfast')")
    gates = PruningGates(enc, heads, ffn, layers, init_keep)
    p = next(model.parameters())
    gates.to(device=p.device)
    model.kdfast_gates = gates
    model._kdfast_hooks = []
    for i, layer in enumerate(enc):
        if heads or layers:
            layer.attention.self.kdfast_head_gates = _HeadGateFn(gates, i)
        if ffn or layers:
            model._kdfast_hooks.append(layer.intermediate.register_forward_hook(_ffn_hook(gates, i)))
    return gates


def remove_gates(model: nn.Module) -> None:
    """Undo :func:`add_gates` (the model computes as it did before)."""
    for h in getattr(model, "_kdfast_hooks", []):
        h.remove()
    for layer in encoder_layers(model):
        sa = layer.attention.self
        if hasattr(sa, "kdfast_head_gates"):
            del sa.kdfast_head_gates
    if hasattr(model, "kdfast_gates"):
        del model.kdfast_gates
    if hasattr(model, "_kdfast_hooks"):
        del model._kdfast_hooks
