"""Records, windows and soft labels for the augmentation loop (in memory, no datasets cache).

A *record* is one question in HF SQuAD column layout (``id``, ``title``, ``context``,
``question``, ``answers``). Windows come from :func:`kdfast.qa.features.prepare_train_features`
(the run_qa.py rule); the teacher's start/end logits are attached to every window
(``teacher_start`` / ``teacher_end``, one float per token), so every sample the student
sees carries valid soft labels.
"""
from __future__ import annotations

import random

import torch

from kdfast.qa.collate import QACollator
from kdfast.qa.features import prepare_train_features


def synthetic_domains(source, target, *, n_source, n_target, n_target_dev_pool, n_eval, seed=0):
    """Built-in data for a (source domain, target domain) pair.

    Returns ``{"source": records, "target": records (train split), "eval": records}``:
    ``source`` is resource-rich (``n_source`` train questions of ``source``), ``target``
    holds ``n_target + n_target_dev_pool`` target train questions (the loop splits its
    own dev off them), ``eval`` is ``n_eval`` questions of the target's *validation* split
    (entities never seen in train). ``source`` may be a domain or a tuple of domains.
    """
    from kdfast.qa.synthetic import generate_domain

    sources = (source,) if isinstance(source, str) else tuple(source)
    if target in sources:
        raise ValueError(f"target domain {target!r} is also a source domain")
    src = []
    for i, d in enumerate(sources):
        n = n_source // len(sources) + (i < n_source % len(sources))
        src += [dict(r, domain=d) for r in generate_domain(d, n, split="train", seed=seed)]
    tgt = generate_domain(target, n_target + n_target_dev_pool, split="train", seed=seed + 1)
    ev = generate_domain(target, n_eval, split="validation", seed=seed + 2)
    return {"source": src, "target": tgt, "eval": ev}


def split_target(records, dev_size, seed):
    """Split target train records into (train, held-out dev) **by passage**: no dev passage,
    question or id occurs in train. ``dev_size``: questions wanted in dev (whole passages are
    taken until at least that many)."""
    by_ctx = {}
    for r in records:
        by_ctx.setdefault(r["context"], []).append(r)
    contexts = list(by_ctx)
    random.Random(f"augment-split:{seed}").shuffle(contexts)
    dev, train = [], []
    for c in contexts:
        (dev if len(dev) < dev_size else train).extend(by_ctx[c])
    if dev_size > 0 and not train:
        raise ValueError(f"target data too small: {len(records)} questions, dev_size={dev_size} leaves no train")
    return train, dev


def answered(records):
    return [r for r in records if r["answers"]["text"]]


def to_windows(records, tokenizer, max_seq_length=256, doc_stride=96):
    """Records -> list of window dicts (``prepare_train_features`` columns)."""
    if not records:
        return []
    cols = {k: [r[k] for r in records] for k in ("id", "question", "context", "answers")}
    out = prepare_train_features(cols, tokenizer, max_seq_length=max_seq_length, doc_stride=doc_stride,
                                 pad_to_max_length=False)
    n = len(out["input_ids"])
    return [{k: out[k][i] for k in out} for i in range(n)]


def batches(windows, batch_size, rng):
    order = list(range(len(windows)))
    rng.shuffle(order)
    for b in range(0, len(order), batch_size):
        yield [windows[i] for i in order[b:b + batch_size]]


def collate(tokenizer, windows):
    """Windows -> tensors; teacher rows (when present) as ``[B, L]`` (0 past a window's end)."""
    batch = QACollator(tokenizer, pad_to_multiple_of=None)(windows)
    if "teacher_start" in windows[0]:
        L = batch["input_ids"].shape[1]
        ts = torch.zeros(len(windows), L)
        te = torch.zeros(len(windows), L)
        for i, w in enumerate(windows):
            n = len(w["teacher_start"])
            ts[i, :n] = torch.as_tensor(w["teacher_start"])
            te[i, :n] = torch.as_tensor(w["teacher_end"])
        batch["teacher_start_logits"], batch["teacher_end_logits"] = ts, te
    if any("mix_input_ids" in w for w in windows):  # MixKD pairs: the second sequence, padded like the first
        L = batch["input_ids"].shape[1]
        mix = batch["input_ids"].clone()  # plain rows mix with themselves (lambda 1)
        for i, w in enumerate(windows):
            if "mix_input_ids" in w:
                row = torch.as_tensor(w["mix_input_ids"][:L])
                mix[i] = tokenizer.pad_token_id
                mix[i, :row.numel()] = row
        batch["mix_input_ids"] = mix
        batch["mix_lambda"] = torch.tensor([float(w.get("mix_lambda", 1.0)) for w in windows])
    return batch


MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def forward(model, batch):
    """QA forward over a collated batch; MixKD rows (``mix_input_ids``) mix the two sequences'
    word embeddings in the model's own embedding space: ``l * E[a] + (1 - l) * E[b]``."""
    kw = {k: batch[k] for k in MODEL_INPUTS if k in batch}
    if "mix_input_ids" in batch:
        emb = model.get_input_embeddings()
        lam = batch["mix_lambda"][:, None, None]
        ids = kw.pop("input_ids")
        kw["inputs_embeds"] = lam * emb(ids) + (1 - lam) * emb(batch["mix_input_ids"])
    return model(**kw)


@torch.no_grad()
def relabel(teacher, tokenizer, windows, batch_size=32):
    """Attach the teacher's start/end logits to every window (in place; returns ``windows``)."""
    was = teacher.training
    teacher.eval()
    try:
        for b in range(0, len(windows), batch_size):
            chunk = windows[b:b + batch_size]
            out = forward(teacher, collate(tokenizer, [{k: v for k, v in w.items()
                                                         if not k.startswith("teacher_")} for w in chunk]))
            for i, w in enumerate(chunk):
                n = len(w["input_ids"])
                w["teacher_start"] = out.start_logits[i, :n].float().tolist()
                w["teacher_end"] = out.end_logits[i, :n].float().tolist()
    finally:
        teacher.train(was)
    return windows
