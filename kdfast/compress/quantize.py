"""Ternary quantization of whole models: quantize, freeze, save and load.

    model = kdfast.compress.quantize(model, method="twn", act_bits=8)   # packed, inference form
    kdfast.compress.save_quantized(model, "model.pt")                    # ~16x smaller than fp32
    model = kdfast.compress.load_quantized(build_float_model(), "model.pt")

    qat = kdfast.compress.quantize(model, qat=True)   # latent weights + STE, train it ...
    kdfast.compress.freeze(qat)                         # ... then pack for inference

    quantize(model, embeddings="all")                   # embedding tables too (TernaryBERT: the word one)
    save_quantized(model, "model.pt", float_dtype="float16")   # what stays full precision, stored as fp16

``model.kdfast_ternary`` records every ternarized module by name: ``{"kind": "linear", in_features,
out_features, bias, method, granularity, act_bits, clip}`` or ``{"kind": "embedding",
num_embeddings, embedding_dim, padding_idx, method, granularity, clip}`` (files written before
embeddings existed have no "kind": linear). :func:`load_quantized` rebuilds exactly those modules.
"""
from __future__ import annotations

import fnmatch
import os
from typing import Iterable

import torch
from torch import nn

from kdfast.nn.ternary_embedding import TernaryEmbedding
from kdfast.nn.ternary_linear import TernaryLinear
from kdfast.nn.ternary_weight import TernaryWeight, check_ternary_options

# Task heads stay in full precision by default (TernaryBERT keeps them too):
# HF names of QA / classification / LM heads and pooler.
DEFAULT_SKIP = ("*qa_outputs*", "*classifier*", "*pooler*", "*lm_head*", "*score*")
_CONFIG_KEY = "kdfast_ternary"
_FLOAT_KEY = "kdfast_float_dtype"  # in the file and on the model: storage dtype of the full-precision tensors
FLOAT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
EMBEDDING_CHOICES = ("word", "all")


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) or name == p for p in patterns)


def _set_submodule(model: nn.Module, name: str, new: nn.Module):
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _embedding_names(model: nn.Module, embeddings) -> list[str]:
    """Names of the ``nn.Embedding`` modules that ``embeddings`` selects (see :func:`quantize`)."""
    if embeddings is None:
        return []
    specs = (embeddings,) if isinstance(embeddings, str) else tuple(embeddings)
    tables = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Embedding, TernaryEmbedding))}
    chosen = []
    for spec in specs:
        if not isinstance(spec, str):
            raise TypeError(f"embeddings must be None, 'word', 'all' or module-name patterns, got {spec!r}")
        if spec == "all":
            hits = list(tables)
        elif spec == "word":
            get = getattr(model, "get_input_embeddings", None)
            emb = get() if callable(get) else None
            hits = [n for n, m in tables.items() if m is emb]
            if not hits:
                raise ValueError("embeddings='word' needs a model whose get_input_embeddings() returns one of its "
                                 "nn.Embedding modules (a transformers model); pass module-name patterns instead "
                                 f"(its embeddings: {sorted(tables)})")
        else:
            hits = [n for n in tables if _matches(n, (spec,))]
            if not hits:
                raise ValueError(f"embeddings pattern {spec!r} matches no nn.Embedding of the model "
                                 f"(its embeddings: {sorted(tables)})")
        chosen += [h for h in hits if h not in chosen and type(tables[h]) is nn.Embedding]
    out = getattr(model, "get_output_embeddings", None)
    out = out() if callable(out) else None
    tied = getattr(out, "weight", None)
    for name in chosen:
        if tied is not None and tables[name].weight is tied:
            raise ValueError(f"embeddings: {name} is tied to the output embedding (the LM head shares its weight); "
                             "ternarizing it would untie them: leave it out of embeddings=")
    return chosen


def quantize(model: nn.Module, method: str = "twn", act_bits: int | None = None,
             skip: Iterable[str] | None = DEFAULT_SKIP, qat: bool = False, granularity: str = "row",
             clip: float = 2.5, embeddings: str | Iterable[str] | None = None) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` (in place) by a :class:`TernaryLinear`, and the chosen
    ``nn.Embedding`` modules by :class:`TernaryEmbedding`.

    Args:
        method, granularity, act_bits, clip: see :class:`kdfast.nn.TernaryLinear`
            (embeddings take method, granularity and clip; ``"row"``: a scale per embedding row).
        skip: fnmatch patterns of module names to keep in full precision
            (default: QA / classifier heads, pooler, LM head). ``None`` or ``()``
            quantizes every Linear. Applies to the embeddings too.
        qat: keep latent full-precision weights for quantization-aware training;
            False (default) gives the packed inference form whose state_dict
            holds only packed weights, scales and biases.
        embeddings: which embedding tables to ternarize. ``None`` or ``()`` (default): none,
            as before embeddings could be; ``"word"``: the input word embedding
            (``model.get_input_embeddings()``, TernaryBERT); ``"all"``: every ``nn.Embedding``
            (for BERT also position and token-type); otherwise fnmatch patterns of module
            names (a string or a list; ``"word"`` / ``"all"`` may appear in the list).
            A pattern that matches no embedding, or an embedding tied to the LM head, is a ValueError.

    Returns the model (modified in place). The options used are recorded on
    the model (``model.kdfast_ternary``) for :func:`save_quantized`.
    """
    clip = check_ternary_options(method, granularity, clip)
    if act_bits not in (None, 8):
        raise ValueError(f"act_bits must be None or 8, got {act_bits!r}")
    skip = tuple(skip or ())
    emb_names = [n for n in _embedding_names(model, embeddings) if not _matches(n, skip)]
    done = {}
    for name in emb_names:
        mod = model.get_submodule(name)
        new = TernaryEmbedding.from_embedding(mod, method=method, granularity=granularity, qat=qat, clip=clip)
        new.train(mod.training)
        _set_submodule(model, name, new)
        done[name] = dict(kind="embedding", num_embeddings=mod.num_embeddings, embedding_dim=mod.embedding_dim,
                          padding_idx=mod.padding_idx, method=method, granularity=granularity, clip=clip)
    for name, mod in list(model.named_modules()):
        # A fully pruned sublayer (compact) keeps an empty Linear: nothing to ternarize, keep it as it is.
        empty = type(mod) is nn.Linear and (mod.in_features == 0 or mod.out_features == 0)
        if type(mod) is nn.Linear and not empty and not _matches(name, skip):
            new = TernaryLinear.from_linear(mod, method=method, granularity=granularity, act_bits=act_bits,
                                            qat=qat, clip=clip)
            new.train(mod.training)
            _set_submodule(model, name, new)
            done[name] = dict(kind="linear", in_features=mod.in_features, out_features=mod.out_features,
                              bias=mod.bias is not None, method=method, granularity=granularity,
                              act_bits=act_bits, clip=clip)
    cfg = dict(getattr(model, _CONFIG_KEY, {}))
    cfg.update(done)
    setattr(model, _CONFIG_KEY, cfg)
    return model


def freeze(model: nn.Module) -> nn.Module:
    """Turn every QAT :class:`TernaryLinear` / :class:`TernaryEmbedding` of ``model`` into the packed
    inference form (in place)."""
    for mod in model.modules():
        if isinstance(mod, TernaryWeight):
            mod.freeze()
    return model


def _float_dtype_name(float_dtype, what="float_dtype") -> str | None:
    if float_dtype is None:
        return None
    for name, dt in FLOAT_DTYPES.items():
        if float_dtype in (name, dt):
            return name
    raise ValueError(f"{what} must be None or one of {sorted(FLOAT_DTYPES)}, got {float_dtype!r}")


def _floating_keys(sd: dict) -> list[str]:
    return [k for k, v in sd.items() if torch.is_tensor(v) and v.is_floating_point()]


def save_quantized(model: nn.Module, path: str | os.PathLike, *, float_dtype=None) -> None:
    """Save ``model``'s state_dict plus the ternary layer config to ``path`` (torch.save).

    ``float_dtype``: storage dtype of every floating tensor: what is not ternary (embeddings left
    in full precision, LayerNorm, biases, the head) and the ternary scales (a relative rounding
    of 2^-11 in float16, far below the ternary error; in float32 they were 12.8 of the 129.5 KB
    of the demo student's file: 11.98x smaller than its source, 12.6x with them in float16):
    ``"float16"`` / ``"bfloat16"`` / ``"float32"`` or the torch dtype; ``None`` (default): the
    model's recorded choice (``model.kdfast_float_dtype``, set by :func:`load_quantized`),
    else the tensors' own dtypes. The choice is recorded in the file, and :func:`load_quantized`
    casts the tensors back to the model's dtypes."""
    name = _float_dtype_name(float_dtype if float_dtype is not None else getattr(model, _FLOAT_KEY, None))
    sd = model.state_dict()
    obj = {"state_dict": sd, _CONFIG_KEY: getattr(model, _CONFIG_KEY, {})}
    if name is not None:
        dt = FLOAT_DTYPES[name]
        sd = dict(sd)
        for k in _floating_keys(sd):
            sd[k] = sd[k].to(dt)
        obj.update(state_dict=sd, **{_FLOAT_KEY: name})
    torch.save(obj, path)


def _module_for(model, name, c, sd, where):
    """The empty inference-form (or QAT-form, when the file has its latent weight) module of entry ``c``,
    after checking that the model's module ``name`` has the saved shape."""
    kind = c.get("kind", "linear")
    try:
        old = model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"{where}: the file ternarizes {kind} {name!r}, which the model does not have "
                         "(it was saved from another architecture)") from None
    dev = next(iter(old.parameters()), next(iter(old.buffers()), torch.empty(0))).device
    qat = f"{name}.weight" in sd
    if kind == "embedding":
        have = (getattr(old, "num_embeddings", None), getattr(old, "embedding_dim", None))
        want = (c["num_embeddings"], c["embedding_dim"])
        if have != want:
            raise ValueError(f"{where}: {name} is a {want[0]} x {want[1]} embedding in the file but "
                             f"{type(old).__name__} {have} in the model (saved from another architecture?)")
        return TernaryEmbedding(*want, c["padding_idx"], method=c["method"], granularity=c["granularity"],
                                qat=qat, clip=c["clip"], device=dev)
    if kind != "linear":
        raise ValueError(f"{where}: unknown ternary module kind {kind!r} for {name}")
    have = (getattr(old, "in_features", None), getattr(old, "out_features", None))
    if have != (c["in_features"], c["out_features"]):
        raise ValueError(f"{where}: {name} is a Linear {c['in_features']} -> {c['out_features']} in the file but "
                         f"{type(old).__name__} {have} in the model (saved from another architecture?)")
    return TernaryLinear(c["in_features"], c["out_features"], bias=c["bias"], method=c["method"],
                         granularity=c["granularity"], act_bits=c["act_bits"], qat=qat, clip=c["clip"], device=dev)


def load_quantized(model: nn.Module, path_or_obj, map_location="cpu", strict: bool = True) -> nn.Module:
    """Restore a model saved by :func:`save_quantized` into ``model`` (its float architecture).

    The Linear and Embedding modules listed in the saved config are replaced by empty
    inference-form :class:`TernaryLinear` / :class:`TernaryEmbedding` (QAT form where the file
    holds latent weights), then the state dict is loaded; tensors stored in a smaller float
    dtype (``float_dtype=`` of :func:`save_quantized`) are cast back to the model's dtypes.
    A file that does not fit the model (other shapes, modules it lacks, tensors not in the
    recorded dtype) is a ValueError naming the module or tensor. Returns ``model`` (modified in place).
    """
    where = "load_quantized" if isinstance(path_or_obj, dict) else f"load_quantized({str(path_or_obj)!r})"
    obj = path_or_obj if isinstance(path_or_obj, dict) else torch.load(path_or_obj, map_location=map_location,
                                                                         weights_only=True)
    if _CONFIG_KEY not in obj or "state_dict" not in obj:
        raise ValueError("not a kdfast ternary checkpoint (expected keys 'state_dict' and "
                         f"'{_CONFIG_KEY}'; save with kdfast.compress.save_quantized)")
    cfg = obj[_CONFIG_KEY]
    sd = dict(obj["state_dict"])
    float_name = _float_dtype_name(obj.get(_FLOAT_KEY), what=f"{where}: the file's {_FLOAT_KEY}")
    for name, c in cfg.items():
        _set_submodule(model, name, _module_for(model, name, c, sd, where))
    if float_name is not None:
        target = model.state_dict()
        for k in _floating_keys(sd):
            if sd[k].dtype != FLOAT_DTYPES[float_name]:
                raise ValueError(f"{where}: tensor {k} is {sd[k].dtype} but the file records "
                                 f"{_FLOAT_KEY}={float_name!r} (the file was altered or not written by save_quantized)")
            if k in target:
                sd[k] = sd[k].to(target[k].dtype)
    model.load_state_dict(sd, strict=strict)
    setattr(model, _CONFIG_KEY, dict(cfg))
    setattr(model, _FLOAT_KEY, float_name)
    return model
