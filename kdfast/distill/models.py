"""Saving and loading the pipeline's QA models: dense, pruned (compacted) and ternary.

    model = load_qa_model("out/stage3-ternary/model")     # any of the three kinds
    model, tok = load_qa_model(path, with_tokenizer=True)

- dense: a stock ``save_pretrained`` directory (``AutoModelForQuestionAnswering``
  loads it without kdfast);
- pruned: ``kdfast.compress.save_pruned`` (per-layer shapes in the config);
- ternary: the pruned/dense config plus ``ternary.pt`` (packed 2-bit weights,
  ``kdfast.compress.save_quantized``) instead of float weights.
"""
from __future__ import annotations

import glob
import json
import os

TERNARY_FILE = "ternary.pt"


def model_kind(path: str) -> str:
    """``"ternary"``, ``"pruned"`` or ``"dense"`` for a model directory (FileNotFoundError if it is none)."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model directory {path!r} does not exist")
    if not os.path.exists(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{path!r} has no config.json: not a model directory")
    if os.path.exists(os.path.join(path, TERNARY_FILE)):
        return "ternary"
    with open(os.path.join(path, "config.json")) as fh:
        cfg = json.load(fh)
    from kdfast.compress.pruned_io import CONFIG_KEY
    return "pruned" if cfg.get(CONFIG_KEY) else "dense"


def _build_from_config(path: str, attn_implementation):
    """Empty model of the saved architecture (per-layer pruned shapes applied)."""
    import transformers
    from kdfast.compress.compact import apply_structure
    from kdfast.compress.pruned_io import CONFIG_KEY
    config = transformers.AutoConfig.from_pretrained(path)
    structure = getattr(config, CONFIG_KEY, None)
    full = (structure or {}).get("full_hidden_size")
    if full is not None:
        config.hidden_size = int(full)
    archs = getattr(config, "architectures", None) or ["AutoModelForQuestionAnswering"]
    cls = getattr(transformers, archs[0], transformers.AutoModelForQuestionAnswering)
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = cls._from_config(config, **kwargs) if hasattr(cls, "_from_config") else cls.from_config(config, **kwargs)
    if structure:
        apply_structure(model, structure)
    return model


def load_qa_model(path: str, *, attn_implementation: str | None = "sdpa", with_tokenizer: bool = False):
    """Load a dense, pruned or ternary QA model directory in eval mode (see module doc).

    ``attn_implementation``: ``"sdpa"`` by default (on this project's 2-core AMD EPYC CI machine,
    AVX2 only, the kdfast attention forward measured 3.1x slower than SDPA for 2 heads of 64,
    B=64, L=216: 1.64 vs 0.53 s); ``"kdfast"`` where head gates or q/k/v capture need it."""
    if attn_implementation == "kdfast":
        import kdfast.hf  # noqa: F401  (registers the attention)
    kind = model_kind(path)
    if kind == "ternary":
        from kdfast.compress import load_quantized
        model = load_quantized(_build_from_config(path, attn_implementation), os.path.join(path, TERNARY_FILE))
    elif kind == "pruned":
        from kdfast.compress import load_pruned
        model = load_pruned(path, attn_implementation=attn_implementation)
    else:
        from transformers import AutoModelForQuestionAnswering
        kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
        model = AutoModelForQuestionAnswering.from_pretrained(path, **kwargs)
    model.eval()
    if not with_tokenizer:
        return model
    return model, load_tokenizer(path)


def load_tokenizer(path: str, fallback: str | None = None):
    """The fast tokenizer saved in ``path`` (or ``fallback``); clear error when there is none."""
    from transformers import AutoTokenizer
    for p in (path, fallback):
        if p and (os.path.exists(os.path.join(p, "tokenizer.json")) or
                  os.path.exists(os.path.join(p, "tokenizer_config.json"))):
            tok = AutoTokenizer.from_pretrained(p)
            from kdfast.qa.features import check_tokenizer
            check_tokenizer(tok)
            return tok
    raise FileNotFoundError(f"no tokenizer in {path!r}" + (f" or {fallback!r}" if fallback else "") +
                            "; pass --tokenizer_name DIR (kdfast generate-data saves one in <data>/tokenizer)")


def check_tokenizer_fits(model, tokenizer, what: str = "model") -> None:
    """ValueError when the tokenizer makes ids the model's embedding table does not have."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    n = getattr(emb, "num_embeddings", None)
    if n is not None and len(tokenizer) > n:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the {what}'s embedding has {n} rows: "
                         "they were not made for each other (pass the tokenizer the model was trained with, "
                         "--tokenizer_name DIR)")


def save_ternary(model, path: str, tokenizer=None, *, float_dtype=None) -> None:
    """Save a frozen ternary model: its config (with pruned shapes, if any) and ``ternary.pt``
    (``float_dtype``: storage of the tensors that stay full precision, see
    :func:`kdfast.compress.save_quantized`)."""
    from kdfast.compress import save_quantized
    from kdfast.compress.pruned_io import CONFIG_KEY, current_structure
    os.makedirs(path, exist_ok=True)
    structure = dict(getattr(model.config, CONFIG_KEY, None) or {})
    structure.update(current_structure(model))
    model.config.update({CONFIG_KEY: structure})
    model.config.save_pretrained(path)
    save_quantized(model, os.path.join(path, TERNARY_FILE), float_dtype=float_dtype)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)


def weights_size(path: str) -> int:
    """Bytes of the weight files in a model directory (safetensors / bin / ternary.pt)."""
    files = [f for pat in ("*.safetensors", "*.bin", TERNARY_FILE) for f in glob.glob(os.path.join(path, pat))]
    return sum(os.path.getsize(f) for f in files)


def count_parameters(model, *, encoder_only: bool = False) -> int:
    """Parameters of ``model``; a ternary layer or embedding counts its logical ``rows * cols``
    weights (plus bias), not its packed bytes nor its QAT latent copy."""
    from kdfast.nn.ternary_weight import TernaryWeight
    total = 0
    latent = set()
    for name, mod in model.named_modules():
        if isinstance(mod, TernaryWeight):
            latent.add(f"{name}.weight" if name else "weight")
            if not encoder_only or ".encoder." in f".{name}.":
                total += mod.num_weights
    for name, p in model.named_parameters():
        if name in latent:
            continue
        if encoder_only and ".encoder." not in f".{name}":
            continue
        total += p.numel()
    return total


def encoder_linear_weights(model) -> int:
    """Weights of the encoder's linear layers (what structured pruning removes)."""
    from torch import nn
    from kdfast.nn.ternary_linear import TernaryLinear
    n = 0
    for name, mod in model.named_modules():
        if ".encoder." in f".{name}." and isinstance(mod, (nn.Linear, TernaryLinear)):
            n += mod.in_features * mod.out_features
    return n


def unpad_if_supported(model) -> bool:
    """kdfast's unpadded encoder (:func:`kdfast.hf.unpad_encoder`: padded tokens skipped by every layer,
    forward and backward) on a BERT-family model that runs the kdfast attention; returns whether the
    model now runs unpadded (False for other attention implementations or architectures, which keep
    their padded forward)."""
    if getattr(getattr(model, "config", None), "_attn_implementation", None) != "kdfast":
        return False
    from kdfast.hf import is_unpadded, unpad_encoder
    if is_unpadded(model):
        return True
    try:
        unpad_encoder(model)
    except (ValueError, TypeError, AttributeError):
        return False  # not a BERT-family encoder: the padded forward is used
    return True


def inference_ready(model):
    """Eval mode, plus kdfast's unpadded encoder (padded tokens skipped by every layer) for a
    BERT-family model on the kdfast attention; returns the model."""
    model.eval()
    unpad_if_supported(model)
    return model


__all__ = ["load_qa_model", "load_tokenizer", "check_tokenizer_fits", "save_ternary", "model_kind", "weights_size", "count_parameters",
           "encoder_linear_weights", "inference_ready", "unpad_if_supported"]
