"""SQuAD questions -> model windows (features), following HF ``run_qa.py``.

A question whose context does not fit in ``max_seq_length`` tokens becomes
several overlapping windows (``doc_stride`` tokens of overlap). Every window
keeps ``example_id`` (the question's id) and ``window`` (its index among the
question's windows), so later stages group the windows of one question.

Columns of a training feature: ``input_ids``, ``attention_mask``,
``token_type_ids`` (when the tokenizer makes them), ``start_positions``,
``end_positions`` (the CLS index when the answer is not inside the window, or
the question has none), ``example_id``, ``window``, ``cls_index``,
``context_start``, ``context_end`` (first and last context token of the
window, inclusive) and ``length`` (tokens before padding; the length-grouped
sampler reads it).

An evaluation feature has the same columns except the positions, plus
``offset_mapping``: character offsets into the context for context tokens,
``None`` for question, special and padding tokens (HF convention).

The question comes first unless the tokenizer pads on the left (XLNet-style
models), as in ``run_qa.py``: then the context comes first and is truncated.
"""
from __future__ import annotations

from typing import Any

TRAIN_COLUMNS = ("start_positions", "end_positions")
META_COLUMNS = ("example_id", "window", "cls_index", "context_start", "context_end", "length")


def check_tokenizer(tokenizer) -> None:
    """Raise a clear error unless ``tokenizer`` is a fast (Rust) tokenizer: offsets and
    overflow windows need one."""
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(
            f"kdfast.qa needs a fast tokenizer (offset mappings for answer spans); got {type(tokenizer).__name__}. "
            "Load it with AutoTokenizer.from_pretrained(path, use_fast=True), or save a tokenizer.json with the model.")


def _tokenize(examples, tokenizer, max_seq_length, doc_stride, pad_to_max_length):
    check_tokenizer(tokenizer)
    max_len = tokenizer.model_max_length
    if max_len is not None and max_len < 100_000 and max_seq_length > max_len:
        raise ValueError(f"max_seq_length={max_seq_length} is longer than the tokenizer's model_max_length={max_len}")
    if doc_stride >= max_seq_length:
        raise ValueError(f"doc_stride={doc_stride} must be smaller than max_seq_length={max_seq_length}")
    pad_on_right = tokenizer.padding_side == "right"
    # Leading spaces of questions waste window tokens and confuse some tokenizers (run_qa.py does the same).
    questions = [q.lstrip() for q in examples["question"]]
    contexts = examples["context"]
    enc = tokenizer(
        questions if pad_on_right else contexts,
        contexts if pad_on_right else questions,
        truncation="only_second" if pad_on_right else "only_first",
        max_length=max_seq_length,
        stride=doc_stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
        padding="max_length" if pad_to_max_length else False,
    )
    return enc, (1 if pad_on_right else 0)


def _window_meta(enc, i, context_seq, cls_id):
    ids = enc["input_ids"][i]
    seq = enc.sequence_ids(i)
    cls_index = ids.index(cls_id) if cls_id in ids else 0
    c0 = seq.index(context_seq)
    c1 = len(seq) - 1 - seq[::-1].index(context_seq)
    return seq, cls_index, c0, c1


def _add_meta(out, examples, sample_map, window, cls_index, c0, c1, length):
    out["example_id"] = [examples["id"][s] for s in sample_map]
    out["window"] = window
    out["cls_index"] = cls_index
    out["context_start"] = c0
    out["context_end"] = c1
    out["length"] = length


def _window_numbers(sample_map):
    window, prev, n = [], None, 0
    for s in sample_map:
        n = n + 1 if s == prev else 0
        prev = s
        window.append(n)
    return window


def prepare_train_features(examples: dict[str, list], tokenizer, max_seq_length: int = 384, doc_stride: int = 128,
                           pad_to_max_length: bool = True) -> dict[str, list]:
    """Batched ``datasets.map`` function: questions -> training windows with answer token positions.

    ``examples`` holds HF SQuAD columns (``id``, ``question``, ``context``, ``answers``). The first
    answer is the label (as in ``run_qa.py``); a window that does not contain the whole answer, and
    an unanswerable question, are labelled with the CLS index.
    """
    enc, context_seq = _tokenize(examples, tokenizer, max_seq_length, doc_stride, pad_to_max_length)
    sample_map = enc.pop("overflow_to_sample_mapping")
    offsets_all = enc.pop("offset_mapping")
    starts, ends, cls_l, c0_l, c1_l, lengths = [], [], [], [], [], []
    for i, offsets in enumerate(offsets_all):
        seq, cls_index, c0, c1 = _window_meta(enc, i, context_seq, tokenizer.cls_token_id)
        answers = examples["answers"][sample_map[i]]
        start = end = cls_index
        if len(answers["answer_start"]) > 0:
            start_char = answers["answer_start"][0]
            end_char = start_char + len(answers["text"][0])
            if offsets[c0][0] <= start_char and offsets[c1][1] >= end_char:
                # First token whose span starts after start_char, minus one; last token whose span
                # ends before end_char, plus one (run_qa.py's rule, robust to sub-word splits).
                t = c0
                while t <= c1 and offsets[t][0] <= start_char:
                    t += 1
                start = t - 1
                t = c1
                while t >= c0 and offsets[t][1] >= end_char:
                    t -= 1
                end = t + 1
        starts.append(start)
        ends.append(end)
        cls_l.append(cls_index)
        c0_l.append(c0)
        c1_l.append(c1)
        lengths.append(sum(enc["attention_mask"][i]))
    out = dict(enc)
    out["start_positions"] = starts
    out["end_positions"] = ends
    _add_meta(out, examples, sample_map, _window_numbers(sample_map), cls_l, c0_l, c1_l, lengths)
    return out


def prepare_eval_features(examples: dict[str, list], tokenizer, max_seq_length: int = 384, doc_stride: int = 128,
                          pad_to_max_length: bool = True) -> dict[str, list]:
    """Batched ``datasets.map`` function: questions -> evaluation windows.

    Keeps ``example_id`` and an ``offset_mapping`` with ``None`` for every token outside the
    context, so post-processing maps token spans back to context characters.
    """
    enc, context_seq = _tokenize(examples, tokenizer, max_seq_length, doc_stride, pad_to_max_length)
    sample_map = enc.pop("overflow_to_sample_mapping")
    cls_l, c0_l, c1_l, lengths, offsets_out = [], [], [], [], []
    for i, offsets in enumerate(enc["offset_mapping"]):
        seq, cls_index, c0, c1 = _window_meta(enc, i, context_seq, tokenizer.cls_token_id)
        offsets_out.append([o if seq[k] == context_seq else None for k, o in enumerate(offsets)])
        cls_l.append(cls_index)
        c0_l.append(c0)
        c1_l.append(c1)
        lengths.append(sum(enc["attention_mask"][i]))
    out = dict(enc)
    out["offset_mapping"] = offsets_out
    _add_meta(out, examples, sample_map, _window_numbers(sample_map), cls_l, c0_l, c1_l, lengths)
    return out


def _map(dataset, fn, tokenizer, max_seq_length, doc_stride, pad_to_max_length, num_proc, desc, load_from_cache):
    from datasets import Dataset
    if not isinstance(dataset, Dataset):
        raise TypeError(f"expected a datasets.Dataset of questions, got {type(dataset).__name__}")
    missing = {"id", "question", "context"} - set(dataset.column_names)
    if fn is prepare_train_features:
        missing |= {"answers"} - set(dataset.column_names)
    if missing:
        raise ValueError(f"the questions dataset lacks columns {sorted(missing)} (has {dataset.column_names})")
    return dataset.map(
        fn, batched=True, num_proc=num_proc, remove_columns=dataset.column_names, desc=desc,
        load_from_cache_file=load_from_cache,
        fn_kwargs=dict(tokenizer=tokenizer, max_seq_length=max_seq_length, doc_stride=doc_stride,
                       pad_to_max_length=pad_to_max_length))


def train_features(dataset, tokenizer, *, max_seq_length: int = 384, doc_stride: int = 128,
                   pad_to_max_length: bool = False, num_proc: int | None = None, load_from_cache: bool = True):
    """Questions ``Dataset`` -> training windows ``Dataset`` (see the module doc for columns).

    Default is dynamic padding (``pad_to_max_length=False``): windows keep their own length and
    :class:`QACollator` pads each batch to its longest window. Cached by ``datasets`` fingerprint.
    """
    return _map(dataset, prepare_train_features, tokenizer, max_seq_length, doc_stride, pad_to_max_length, num_proc,
                "windows (train)", load_from_cache)


def eval_features(dataset, tokenizer, *, max_seq_length: int = 384, doc_stride: int = 128,
                  pad_to_max_length: bool = False, num_proc: int | None = None, load_from_cache: bool = True):
    """Questions ``Dataset`` -> evaluation windows ``Dataset`` with ``offset_mapping``."""
    return _map(dataset, prepare_eval_features, tokenizer, max_seq_length, doc_stride, pad_to_max_length, num_proc,
                "windows (eval)", load_from_cache)


def windows_per_example(features, example_ids=None) -> dict[Any, list[int]]:
    """``{example_id: [feature indices]}`` in feature order (the windows of each question).

    ``example_ids``: optional iterable of ids to fix the key order (e.g. the questions dataset's
    ``id`` column); ids without windows then map to ``[]``.
    """
    ids = features["example_id"] if not isinstance(features, list) else [f["example_id"] for f in features]
    groups: dict[Any, list[int]] = {} if example_ids is None else {e: [] for e in example_ids}
    for i, e in enumerate(ids):
        groups.setdefault(e, []).append(i)
    return groups
