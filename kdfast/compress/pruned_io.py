"""Saving and loading compacted (pruned) models with per-layer shapes.

    kdfast.compress.compact(model)
    kdfast.compress.save_pruned(model, "out/")          # config.json + model.safetensors
    model = kdfast.compress.load_pruned("out/", attn_implementation="kdfast")

transformers 5 removed ``prune_heads`` / ``config.pruned_heads``, and a plain
``from_pretrained`` of a pruned checkpoint fails on shape mismatches. Here the
per-layer head counts and FFN widths live in ``config.kdfast_pruning``;
:func:`load_pruned` builds the architecture from the config, resizes each
layer to those shapes and then loads the weights (strictly: every weight must
be present with its shape). With a pruned hidden dim, ``config.hidden_size``
is the kept width and ``kdfast_pruning["full_hidden_size"]`` the original:
the model is built at the original width (so the attention head size is the
original ``full_hidden_size // num_attention_heads``), then resized.
"""
from __future__ import annotations

import glob
import os

import torch
from torch import nn

from kdfast.compress.compact import CONFIG_KEY, apply_structure
from kdfast.compress.prune import encoder_layers


def current_structure(model: nn.Module) -> dict:
    """Per-layer ``{"num_heads": [...], "ffn_dims": [...]}`` read off the modules."""
    nh, fd = [], []
    for layer in encoder_layers(model):
        sa = layer.attention.self
        nh.append(0 if getattr(sa, "num_attention_heads", 0) == 0 or not hasattr(sa, "query")
                  else sa.query.out_features // sa.attention_head_size)
        fd.append(layer.intermediate.dense.out_features)
    return {"num_heads": nh, "ffn_dims": fd}


def save_pruned(model: nn.Module, save_directory: str, **save_kwargs) -> None:
    """``model.save_pretrained(save_directory)`` with the per-layer shapes in the config."""
    if hasattr(model, "kdfast_gates"):
        raise ValueError("model still has kdfast gates: call kdfast.compress.compact(model) before save_pruned")
    structure = dict(getattr(model.config, CONFIG_KEY, None) or {})
    structure.update(current_structure(model))
    model.config.update({CONFIG_KEY: structure})
    model.save_pretrained(save_directory, **save_kwargs)


def _read_state_dict(directory: str) -> dict:
    files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
    if files:
        from safetensors.torch import load_file
        sd = {}
        for f in files:
            sd.update(load_file(f))
        return sd
    files = sorted(glob.glob(os.path.join(directory, "*.bin")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors or *.bin weights in {directory!r}")
    sd = {}
    for f in files:
        sd.update(torch.load(f, map_location="cpu", weights_only=True))
    return sd


def load_pruned(directory: str, *, model_class=None, attn_implementation: str | None = None,
                dtype: torch.dtype | None = None) -> nn.Module:
    """Load a model saved by :func:`save_pruned` (also an unpruned ``save_pretrained`` directory).

    ``model_class`` defaults to ``transformers.<config.architectures[0]>``.
    Returns the model in eval mode.
    """
    import transformers

    config = transformers.AutoConfig.from_pretrained(directory)
    if model_class is None:
        archs = getattr(config, "architectures", None) or []
        if not archs or not hasattr(transformers, archs[0]):
            raise ValueError(f"cannot tell the model class of {directory!r} (config.architectures={archs}); "
                             "pass model_class=")
        model_class = getattr(transformers, archs[0])
    if attn_implementation == "kdfast":
        import kdfast.hf  # noqa: F401  (registers the implementation)
    kwargs = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    structure = getattr(config, CONFIG_KEY, None)
    full = (structure or {}).get("full_hidden_size")
    if full is not None:
        config.hidden_size = int(full)  # build at the original width: head size = full // num_attention_heads
    model = model_class._from_config(config, **kwargs)
    if structure:
        apply_structure(model, structure)
    sd = _read_state_dict(directory)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise RuntimeError(f"load_pruned({directory!r}): missing weights {missing[:5]}, "
                           f"unexpected weights {unexpected[:5]}")
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()
