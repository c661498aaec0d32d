"""Building the student: from a config, from a subset of the teacher's layers, or from a directory.

    layers = parse_student_layers("3", teacher.config.num_hidden_layers)   # [0, 2, 4] of 6
    student = student_from_teacher(teacher, layers)                          # DistilBERT-style init

Taking every other teacher layer is how DistilBERT initialises its student;
embeddings, the pooler and the QA head are copied as they are.
"""
from __future__ import annotations

import copy

import torch
from torch import nn


def parse_student_layers(spec, num_teacher: int) -> list[int]:
    """``"3"`` -> 3 layers spread uniformly over the teacher (``i * N // k``); ``"0,2,4"`` ->
    those 0-based teacher layers (strictly increasing; one layer: ``"2,"``). Raises ValueError
    for a student deeper than its teacher or layers out of range."""
    if isinstance(spec, int) or (isinstance(spec, str) and spec.strip().isdigit()):
        k = int(spec)
        if k < 1:
            raise ValueError(f"--student_layers {spec}: need at least 1 layer")
        if k > num_teacher:
            raise ValueError(f"--student_layers {spec}: a student initialised from the teacher cannot be deeper than "
                             f"the teacher ({num_teacher} layers)")
        return [i * num_teacher // k for i in range(k)]
    try:
        parts = spec.split(",") if isinstance(spec, str) else spec
        layers = [int(x) for x in parts if not (isinstance(x, str) and not x.strip())]
    except ValueError:
        raise ValueError(f"--student_layers {spec!r}: expected a layer count ('3') or 0-based teacher layers "
                         "('0,2,4')") from None
    if not layers:
        raise ValueError("--student_layers: empty list")
    bad = [i for i in layers if not 0 <= i < num_teacher]
    if bad:
        raise ValueError(f"--student_layers {spec!r}: layers {bad} are outside the teacher's 0..{num_teacher - 1}")
    if any(b <= a for a, b in zip(layers, layers[1:])):
        raise ValueError(f"--student_layers {spec!r}: layers must be strictly increasing")
    return layers


def _register(impl):
    if impl == "kdfast":
        import kdfast.hf  # noqa: F401  (registers the "kdfast" attention with transformers)


def _encoder_layers(model: nn.Module) -> nn.ModuleList:
    base = getattr(model, model.base_model_prefix, model)
    enc = getattr(base, "encoder", None)
    layers = getattr(enc, "layer", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(model).__name__}: expected a BERT-family encoder (<base>.encoder.layer)")
    return layers


def student_from_teacher(teacher: nn.Module, layers: list[int], *, attn_implementation: str | None = None):
    """A student with the teacher's width and the given teacher layers (copied weights).

    Returns a new model of the teacher's class in train mode; the teacher is unchanged.
    """
    cfg = copy.deepcopy(teacher.config)
    cfg.num_hidden_layers = len(layers)
    if getattr(cfg, "layer_types", None) is not None:
        cfg.layer_types = [cfg.layer_types[i] for i in layers]
    impl = attn_implementation or getattr(teacher.config, "_attn_implementation", None)
    _register(impl)
    kwargs = {"attn_implementation": impl} if impl else {}
    student = type(teacher)._from_config(cfg, **kwargs)
    t_layers = _encoder_layers(teacher)
    s_layers = _encoder_layers(student)
    sd = {}
    prefix = None
    for name, _ in teacher.named_modules():
        if name.endswith("encoder.layer"):
            prefix = name
            break
    for k, v in teacher.state_dict().items():
        if prefix and k.startswith(prefix + "."):
            rest = k[len(prefix) + 1:]
            idx, tail = rest.split(".", 1)
            if int(idx) in layers:
                sd[f"{prefix}.{layers.index(int(idx))}.{tail}"] = v.clone()
        else:
            sd[k] = v.clone()
    missing, unexpected = student.load_state_dict(sd, strict=False)
    if unexpected or [m for m in missing if "position_ids" not in m]:
        raise RuntimeError(f"student_from_teacher: missing {missing[:5]}, unexpected {unexpected[:5]}")
    assert len(s_layers) == len(layers) <= len(t_layers)
    return student.train()


def student_from_config(config, *, attn_implementation: str | None = None, seed: int | None = None):
    """A randomly initialised ``AutoModelForQuestionAnswering`` from ``config``."""
    from transformers import AutoModelForQuestionAnswering
    _register(attn_implementation)
    if seed is not None:
        torch.manual_seed(seed)
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    return AutoModelForQuestionAnswering.from_config(copy.deepcopy(config), **kwargs).train()


def check_compatible(teacher_tokenizer, student_tokenizer, teacher_config=None, student_config=None) -> None:
    """Raise ValueError when teacher and student cannot share windows (different vocabularies)."""
    if teacher_tokenizer is not None and student_tokenizer is not None:
        tv, sv = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
        if tv != sv:
            diff = len(set(tv.items()) ^ set(sv.items()))
            raise ValueError(f"teacher and student tokenizers differ ({len(tv)} vs {len(sv)} tokens, {diff} entries "
                             "differ): the teacher's logits would refer to other tokens. Use one tokenizer for both.")
    if teacher_config is not None and student_config is not None:
        if teacher_config.vocab_size != student_config.vocab_size:
            raise ValueError(f"teacher vocab_size {teacher_config.vocab_size} != student vocab_size "
                             f"{student_config.vocab_size}")
