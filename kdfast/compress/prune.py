"""Structured-pruning gates for BERT-family HuggingFace models.

    import kdfast.hf                                   # the gates act inside the kdfast attention
    model = AutoModelForQuestionAnswering.from_config(cfg, attn_implementation="kdfast")
    gates = kdfast.compress.add_gates(model, heads=True, ffn=True, hidden=True)
    ctl = kdfast.nn.SparsityController(target=0.6, warmup_steps=2000)
    ...
    loss = task_or_kd_loss + ctl.penalty(gates.expected_sparsity(), step)
    ...
    model.eval(); kdfast.compress.compact(model)         # physically removes pruned heads / units / dims

Gates (one :class:`~kdfast.nn.HardConcreteGate` each, held in
``model.kdfast_gates``, so they are parameters of the model):

- ``heads``: one per attention head per layer, applied inside
  :func:`kdfast.ops.attention` (the head gate is fused into the output write),
- ``ffn``: one per FFN intermediate unit per layer (scales the intermediate
  activations),
- ``layers``: one for each whole attention and FFN sublayer per layer
  (CoFi ``mha_z`` / ``ffn_z``), multiplying the finer gates,
- ``hidden``: one gate over the hidden dimension d_model, shared by the
  embeddings and every layer (CoFi ``hidden_z``): it multiplies each sublayer
  output written to the residual stream, and the residual LayerNorms become
  :class:`~kdfast.compress.hidden.GatedLayerNorm` (statistics over the kept
  dims only, output times the gate, exact zeros in pruned dims), so that
  :func:`~kdfast.compress.compact` can remove the pruned dims exactly. See
  :mod:`kdfast.compress.hidden`. Works with any attention implementation.

Expected sizes follow CoFi: a layer's expected prunable parameters are
``4 * E[d] * dh * E[heads] + 2 * E[d] * E[ffn units]`` (expectations of
independent gates multiply; ``E[d] = d_model`` without a hidden gate).
Embeddings and the task head are not counted (as in CoFi).

Works on models whose encoder is ``<model>.<base>.encoder.layer[i]`` with
``attention.self.{query,key,value}``, ``attention.output.dense``,
``intermediate.dense`` and ``output.dense`` (BERT, RoBERTa, ELECTRA, ...).
The model must use ``attn_implementation="kdfast"`` for head gates to act.
"""
from __future__ import annotations

import torch
from torch import nn

from kdfast.compress import hidden as _hidden
from kdfast.nn.gates import HardConcreteGate


def encoder_layers(model: nn.Module):
    """The list of transformer layers of a BERT-family model (raises if not found)."""
    for m in model.modules():
        layers = getattr(getattr(m, "encoder", None), "layer", None)
        if isinstance(layers, nn.ModuleList) and len(layers) and hasattr(layers[0], "attention") \
                and hasattr(layers[0], "intermediate"):
            return layers
    raise ValueError("model has no BERT-family encoder (expected .encoder.layer[i].attention/.intermediate)")


def base_model(model: nn.Module):
    """The module holding ``.embeddings`` and ``.encoder`` (e.g. ``model.bert``; raises if not found)."""
    for m in model.modules():
        layers = getattr(getattr(m, "encoder", None), "layer", None)
        if isinstance(layers, nn.ModuleList) and hasattr(m, "embeddings"):
            return m
    raise ValueError("model has no BERT-family base model (expected .embeddings and .encoder.layer)")


def _head_dim(sa):
    return sa.attention_head_size


def _n_heads(sa):
    return sa.query.out_features // sa.attention_head_size


class PruningGates(nn.Module):
    """The gates of one model, with expected size and sparsity reports."""

    def __init__(self, layers, heads, ffn, layer_gates, init_keep, hidden=False, cost="params", seq_len=None):
        super().__init__()
        if cost not in ("params", "flops"):
            raise ValueError(f"add_gates: cost must be 'params' or 'flops', not {cost!r}")
        if cost == "flops" and not (seq_len and seq_len > 0):
            raise ValueError("add_gates(cost='flops') needs seq_len > 0 (the typical number of tokens per sequence)")
        self.cost, self.seq_len = cost, float(seq_len or 0)
        self.head = nn.ModuleList()
        self.ffn = nn.ModuleList()
        self.mha_layer = nn.ModuleList()
        self.ffn_layer = nn.ModuleList()
        self.has = {"heads": heads, "ffn": ffn, "layers": layer_gates, "hidden": hidden}
        self.hidden = HardConcreteGate(layers[0].attention.self.query.in_features, init_keep=init_keep) \
            if hidden else None
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

    def hidden_values(self):
        """Hidden-gate values ``[D]`` (a sample in training, deterministic in eval), or None."""
        return self.hidden() if self.has["hidden"] else None

    # --- expected size ------------------------------------------------------
    def _expected_hidden(self, d):
        return self.hidden.prob_nonzero().sum() if self.has["hidden"] else torch.tensor(float(d))

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
            ed = self._expected_hidden(d)
            total = total + 4 * ed * dh * eh + 2 * ed * ef
        return total

    def full_flops(self):
        """Multiply-adds per token of the unpruned encoder's prunable parts at ``seq_len`` tokens:
        per head its q, k, v, o projections (4 d dh) and its attention (2 L dh: scores and the
        weighted sum of values); per FFN unit 2 d."""
        L = self.seq_len
        return sum(H * (4 * d * dh + 2 * L * dh) + 2 * d * F_ for H, dh, d, F_ in self.shapes)

    def expected_flops(self):
        """Expected remaining multiply-adds per token (differentiable scalar), as :meth:`full_flops`."""
        L, total = self.seq_len, 0.0
        for i, (H, dh, d, F_) in enumerate(self.shapes):
            eh, ef = self._expected_units(i)
            ed = self._expected_hidden(d)
            total = total + eh * (4 * ed * dh + 2 * L * dh) + 2 * ed * ef
        return total

    def expected_sparsity(self):
        """The fraction expected to be pruned (differentiable scalar): feed it to
        SparsityController.penalty. ``cost="params"``: 1 - expected_params / full_params;
        ``cost="flops"``: 1 - expected_flops / full_flops, which charges a head for its attention
        too (at L=256, d=128, dh=64 a head's attention is as much work as its projections)."""
        if self.cost == "flops":
            return 1.0 - self.expected_flops() / self.full_flops()
        return 1.0 - self.expected_params() / self.full_params()

    @torch.no_grad()
    def report(self):
        """Per layer: expected heads, FFN units, hidden dims and parameters, and the hard (eval) counts."""
        rows = []
        zv = self._eval(lambda _: self.hidden_values(), 0)
        for i, (H, dh, d, F_) in enumerate(self.shapes):
            eh, ef = self._expected_units(i)
            ed = self._expected_hidden(d)
            hv = self._eval(self.head_values, i)
            fv = self._eval(self.ffn_values, i)
            kh = int((hv > 0).sum()) if hv is not None else H
            kf = int((fv > 0).sum()) if fv is not None else F_
            kd = int((zv > 0).sum()) if zv is not None else d
            rows.append({"layer": i, "heads": H, "expected_heads": float(eh), "kept_heads": kh,
                         "ffn": F_, "expected_ffn": float(ef), "kept_ffn": kf,
                         "hidden": d, "expected_hidden": float(ed), "kept_hidden": kd,
                         "expected_params": float(4 * ed * dh * eh + 2 * ed * ef),
                         "kept_params": 4 * kd * dh * kh + 2 * kd * kf})
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



_SWITCH_WARNED = False


def _use_kdfast_attention(model: nn.Module, impl) -> None:
    """Head gates act inside the kdfast attention: switch ``model`` to it (said once per process)."""
    global _SWITCH_WARNED
    import warnings

    import kdfast.hf  # noqa: F401  (registers attn_implementation="kdfast")
    setter = getattr(model, "set_attn_implementation", None)
    if setter is None:
        raise ValueError(f"head gates act inside the kdfast attention, but the model uses attn_implementation="
                         f"{impl!r} and cannot switch; build it with attn_implementation='kdfast'")
    setter("kdfast")
    if getattr(model.config, "_attn_implementation", None) != "kdfast":
        raise ValueError(f"add_gates: could not switch the model from attn_implementation={impl!r} to 'kdfast'")
    if not _SWITCH_WARNED:
        _SWITCH_WARNED = True
        warnings.warn(f"add_gates: head gates act inside the kdfast attention; switched the model from "
                      f"attn_implementation={impl!r} to 'kdfast'", stacklevel=3)


def add_gates(model: nn.Module, *, heads: bool = True, ffn: bool = True, layers: bool = False,
              hidden: bool = False, init_keep: float = 0.9, cost: str = "params",
              seq_len: float | None = None) -> PruningGates:
    """Add L0 gates to a BERT-family HF model in place; returns the :class:`PruningGates`.

    The gates become ``model.kdfast_gates`` (parameters of the model). Head
    gates act through the ``"kdfast"`` attention: a model built with another
    attention is switched to it (with a warning, once); FFN gates through a forward hook on
    each ``intermediate`` module; the hidden gate (``hidden=True``, one gate
    ``[d_model]``) through hooks on the residual writers and gated LayerNorms
    (:mod:`kdfast.compress.hidden`). Call again after :func:`remove_gates` only.

    ``cost``: what ``gates.expected_sparsity()`` (the controller's target) counts as pruned:
    ``"params"`` (prunable weights) or ``"flops"`` (multiply-adds per token at ``seq_len`` tokens,
    attention included: the cost that CPU latency follows; see :meth:`PruningGates.full_flops`).
    """
    if hasattr(model, "kdfast_gates"):
        raise ValueError("model already has kdfast gates (remove_gates(model) first)")
    if not (heads or ffn or layers or hidden):
        raise ValueError("add_gates: enable at least one of heads, ffn, layers, hidden")
    enc = encoder_layers(model)
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if (heads or layers) and impl != "kdfast":
        _use_kdfast_attention(model, impl)
    base = base_model(model) if hidden else None
    if hidden and any(not hasattr(layer.attention.self, "query") for layer in enc):
        raise ValueError("add_gates(hidden=True) needs every layer's attention (compact after training, not before)")
    gates = PruningGates(enc, heads, ffn, layers, init_keep, hidden=hidden, cost=cost, seq_len=seq_len)
    p = next(model.parameters())
    gates.to(device=p.device)
    gates.train(model.training)  # a model in eval mode gets deterministic gates
    model.kdfast_gates = gates
    model._kdfast_hooks = []
    for i, layer in enumerate(enc):
        if heads or layers:
            layer.attention.self.kdfast_head_gates = _HeadGateFn(gates, i)
        if ffn or layers:
            model._kdfast_hooks.append(layer.intermediate.register_forward_hook(_ffn_hook(gates, i)))
    if hidden:
        gates.hidden_mask, handles = _hidden.install_hidden(base, enc, gates.hidden_values)
        model._kdfast_hooks += handles
    return gates


def remove_gates(model: nn.Module) -> None:
    """Undo :func:`add_gates` (the model computes as it did before)."""
    for h in getattr(model, "_kdfast_hooks", []):
        h.remove()
    gates = getattr(model, "kdfast_gates", None)
    if gates is not None and gates.has.get("hidden"):
        _hidden.remove_hidden(base_model(model), encoder_layers(model))
    for layer in encoder_layers(model):
        sa = layer.attention.self
        if hasattr(sa, "kdfast_head_gates"):
            del sa.kdfast_head_gates
    if hasattr(model, "kdfast_gates"):
        del model.kdfast_gates
    if hasattr(model, "_kdfast_hooks"):
        del model._kdfast_hooks
