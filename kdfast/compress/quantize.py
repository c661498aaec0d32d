"""Ternary quantization of whole models: quantize, freeze, save and load.

    model = kdfast.compress.quantize(model, method="twn", act_bits=8)   # packed, inference form
    kdfast.compress.save_quantized(model, "model.pt")                    # ~16x smaller than fp32
    model = kdfast.compress.load_quantized(build_float_model(), "model.pt")

    qat = kdfast.compress.quantize(model, qat=True)   # latent weights + STE, train it ...
    kdfast.compress.freeze(qat)                         # ... then pack for inference
"""
from __future__ import annotations

import fnmatch
import os
from typing import Iterable

import torch
from torch import nn

from kdfast.nn.ternary_linear import TernaryLinear
from kdfast.ops.ternary_quant import GRANULARITIES, METHODS

# Task heads stay in full precision by default (TernaryBERT keeps them too):
# HF names of QA / classification / LM heads and pooler.
DEFAULT_SKIP = ("*qa_outputs*", "*classifier*", "*pooler*", "*lm_head*", "*score*")
_CONFIG_KEY = "kdfast_ternary"


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) or name == p for p in patterns)


def _set_submodule(model: nn.Module, name: str, new: nn.Module):
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def quantize(model: nn.Module, method: str = "twn", act_bits: int | None = None,
             skip: Iterable[str] | None = DEFAULT_SKIP, qat: bool = False, granularity: str = "row",
             clip: float = 2.5) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` (in place) by a :class:`TernaryLinear`.

    Args:
        method, granularity, act_bits, clip: see :class:`kdfast.nn.TernaryLinear`.
        skip: fnmatch patterns of module names to keep in full precision
            (default: QA / classifier heads, pooler, LM head). ``None`` or ``()``
            quantizes every Linear.
        qat: keep latent full-precision weights for quantization-aware training;
            False (default) gives the packed inference form whose state_dict
            holds only packed weights, scales and biases.

    Returns the model (modified in place). The options used are recorded on
    the model (``model.kdfast_ternary``) for :func:`save_quantized`.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if act_bits not in (None, 8):
        raise ValueError(f"act_bits must be None or 8, got {act_bits!r}")
    skip = tuple(skip or ())
    done = {}
    for name, mod in list(model.named_modules()):
        # A fully pruned sublayer (compact) keeps an empty Linear: nothing to ternarize, keep it as it is.
        empty = type(mod) is nn.Linear and (mod.in_features == 0 or mod.out_features == 0)
        if type(mod) is nn.Linear and not empty and not _matches(name, skip):
            new = TernaryLinear.from_linear(mod, method=method, granularity=granularity, act_bits=act_bits,
                                            qat=qat, clip=clip)
            new.train(mod.training)
            _set_submodule(model, name, new)
            done[name] = dict(in_features=mod.in_features, out_features=mod.out_features,
                              bias=mod.bias is not None, method=method, granularity=granularity,
                              act_bits=act_bits, clip=clip)
    cfg = dict(getattr(model, _CONFIG_KEY, {}))
    cfg.update(done)
    setattr(model, _CONFIG_KEY, cfg)
    return model


def freeze(model: nn.Module) -> nn.Module:
    """Turn every QAT :class:`TernaryLinear` of ``model`` into the packed inference form (in place)."""
    for mod in model.modules():
        if isinstance(mod, TernaryLinear):
            mod.freeze()
    return model


def save_quantized(model: nn.Module, path: str | os.PathLike) -> None:
    """Save ``model``'s state_dict plus the ternary layer config to ``path`` (torch.save)."""
    torch.save({"state_dict": model.state_dict(), _CONFIG_KEY: getattr(model, _CONFIG_KEY, {})}, path)


def load_quantized(model: nn.Module, path_or_obj, map_location="cpu", strict: bool = True) -> nn.Module:
    """Restore a model saved by :func:`save_quantized` into ``model`` (its float architecture).

    The Linear layers listed in the saved config are replaced by empty
    inference-form :class:`TernaryLinear` (no latent weights), then the state
    dict is loaded. Returns ``model`` (modified in place).
    """
    obj = path_or_obj if isinstance(path_or_obj, dict) else torch.load(path_or_obj, map_location=map_location,
                                                                         weights_only=True)
    if _CONFIG_KEY not in obj or "state_dict" not in obj:
        raise ValueError("not a kdfast ternary checkpoint (expected keys 'state_dict' and "
                         f"'{_CONFIG_KEY}'; save with kdfast.compress.save_quantized)")
    cfg = obj[_CONFIG_KEY]
    sd = obj["state_dict"]
    for name, c in cfg.items():
        old = model.get_submodule(name)
        dev = next(iter(old.parameters()), torch.empty(0)).device
        qat = f"{name}.weight" in sd
        new = TernaryLinear(c["in_features"], c["out_features"], bias=c["bias"], method=c["method"],
                            granularity=c["granularity"], act_bits=c["act_bits"], qat=qat, clip=c["clip"],
                            device=dev)
        _set_submodule(model, name, new)
    model.load_state_dict(sd, strict=strict)
    setattr(model, _CONFIG_KEY, dict(cfg))
    return model
