"""Hand-designed augmentation baselines, run in the same loop and budget as the generator.

- ``tinybert``: TinyBERT-style word replacement. Each non-answer word is replaced with
  probability ``rate``: a word that is one WordPiece by an MLM prediction at its position,
  a multi-piece word by one of the nearest whole-word vocabulary entries to the mean of its
  pieces' (teacher) word embeddings.
- ``mixkd``: MixKD-style mixup: two target windows' word embeddings mixed with
  ``l ~ Beta(a, a)`` in each model's own embedding space, relabelled by the teacher on the
  mixture (soft labels only).
- ``source``: source questions added unchanged (plain multi-domain training).
The selector baselines (random keep at the same rate, teacher-confidence top-k) live in
:mod:`kdfast.augment.loop`.
"""
from __future__ import annotations

import random

import torch

from kdfast.augment.generator import _answer, rebuild, words


class EmbeddingNeighbours:
    """Nearest whole-word vocabulary entries (cosine) to a mean of word-piece embeddings."""

    def __init__(self, embedding_weight, allowed, k=5):
        self.w = torch.nn.functional.normalize(embedding_weight.detach().float(), dim=-1)
        self.allowed, self.k = allowed, k

    def neighbours(self, piece_ids):
        v = torch.nn.functional.normalize(self.w[piece_ids].mean(0), dim=-1)
        sim = (self.w @ v).masked_fill(~self.allowed, float("-inf"))
        sim[piece_ids] = float("-inf")
        return sim.topk(self.k).indices.tolist()


def tinybert_replace(record, *, tokenizer, filler, neighbours, rate=0.3, rng=None, generator=None, new_id=None):
    """One word-replacement candidate of ``record`` (answer words untouched, offsets recomputed)."""
    rng = rng or random.Random(0)
    text, start = _answer(record)
    ctx = record["context"]
    segs = words(ctx, tokenizer)
    end = None if text is None else start + len(text)
    free = [i for i, (w, s, e) in enumerate(segs)
            if any(ch.isalnum() for ch in w) and (text is None or e <= start or s >= end)]
    chosen = sorted(i for i in free if rng.random() < rate)
    pieces = tokenizer([w for w, _, _ in segs], add_special_tokens=False)["input_ids"] if segs else []
    replacement = {}
    single = [i for i in chosen if len(pieces[i]) == 1]
    if single:
        ids, slots, sset = [tokenizer.cls_token_id], [], set(single)
        for i in range(len(segs)):
            if i in sset:
                ids.append(tokenizer.mask_token_id)
                slots.append(i)
            else:
                ids += pieces[i]
        ids.append(tokenizer.sep_token_id)
        for i, f in zip(slots, filler.fill(ids, generator)):
            if f is not None:
                replacement[i] = tokenizer.convert_ids_to_tokens(f)
    for i in chosen:
        if len(pieces[i]) > 1:
            cand = neighbours.neighbours(pieces[i])
            replacement[i] = tokenizer.convert_ids_to_tokens(cand[rng.randrange(len(cand))])
    ctx, start = rebuild(ctx, segs, replacement, start)
    out = dict(record)
    out["context"] = ctx
    out["answers"] = {"text": [] if text is None else [text], "answer_start": [] if text is None else [start]}
    out["id"] = new_id or f"{record['id']}-tb"
    out["origin"] = record["id"]
    out["strategy"] = {"mask_rate": rate, "mix_rate": 0.0, "steps": 1}
    return out


def mix_windows(windows, n, *, rng, alpha=0.4):
    """``n`` MixKD windows: window a (its masks, positions) + ``mix_input_ids`` of window b and
    ``mix_lambda`` in [0.5, 1) (max(l, 1 - l), so a stays the dominant sequence)."""
    out = []
    if len(windows) < 2:
        return out
    for _ in range(n):
        a, b = rng.sample(range(len(windows)), 2)
        lam = rng.betavariate(alpha, alpha)
        lam = min(max(lam, 1 - lam), 0.999)
        w = {k: v for k, v in windows[a].items() if not k.startswith("teacher_")}
        w["mix_input_ids"] = list(windows[b]["input_ids"])
        w["mix_lambda"] = lam
        w["example_id"] = f"{windows[a]['example_id']}-mix-{windows[b]['example_id']}"
        out.append(w)
    return out
