"""Cross-domain manipulation: target passages corrupted and reconstructed with source text.

For a target question/passage the nearest source-domain passages are retrieved (mean-pooled
encoder states, cosine). A candidate comes from a short corrupt-and-reconstruct chain: mask a
fraction of the passage's words (never a word that overlaps the answer), fill some masked
runs with spans of the other passage, refill the other masked words with a masked LM, and
repeat ``steps`` times. The answer text is never touched and its character offset is
recomputed after every step, so ``context[start:start + len(text)] == text`` always holds.

The chain starts from one of two bases: ``target`` (the target question and passage, masked
runs filled from the retrieved source passage: new passages for the few target questions) or
``source`` (a question of the retrieved source passage, that passage's masked runs filled from
the target passage: new questions pulled towards the target domain).

A strategy is the tuple (mask rate, mix rate, steps, source domain, base).
"""
from __future__ import annotations

import dataclasses
import itertools
import random
import re

import torch

_WORD = re.compile(r"\w+|[^\w\s]", re.UNICODE)


@dataclasses.dataclass(frozen=True)
class Strategy:
    mask_rate: float = 0.3
    mix_rate: float = 0.5
    steps: int = 1
    source_domain: str = ""
    base: str = "target"

    def __post_init__(self):
        if not 0.0 <= self.mask_rate <= 1.0:
            raise ValueError(f"mask_rate: expected a value in [0, 1], got {self.mask_rate}")
        if not 0.0 <= self.mix_rate <= 1.0:
            raise ValueError(f"mix_rate: expected a value in [0, 1], got {self.mix_rate}")
        if self.steps < 1:
            raise ValueError(f"steps: expected >= 1, got {self.steps}")
        if self.base not in BASES:
            raise ValueError(f"base: expected one of {', '.join(BASES)}, got {self.base!r}")

    def name(self):
        return f"{self.base}-m{self.mask_rate:g}-x{self.mix_rate:g}-k{self.steps}-{self.source_domain or 'src'}"


BASES = ("target", "source")
"""What a candidate starts from: a target question (``target``) or a retrieved source question (``source``)."""


def strategy_grid(source_domains, mask_rates=(0.15, 0.3, 0.5), mix_rates=(0.0, 0.5, 1.0), steps=(1, 2),
                  bases=("target",)):
    """Every strategy of the grid, for every source domain and base."""
    return [Strategy(m, x, k, d, b) for b in bases for d in source_domains for m in mask_rates for x in mix_rates
            for k in steps]


def words(text, tokenizer=None):
    """``[(word, start, end)]``: the tokenizer's pre-tokenization (BERT: whitespace and
    punctuation splits) with character offsets into ``text``; a regex split otherwise."""
    pre = getattr(getattr(tokenizer, "backend_tokenizer", None), "pre_tokenizer", None)
    if pre is not None:
        return [(w, s, e) for w, (s, e) in pre.pre_tokenize_str(text)]
    return [(m.group(), m.start(), m.end()) for m in _WORD.finditer(text)]


def _answer(record):
    a = record["answers"]
    if not a["text"]:
        return None, None
    return a["text"][0], a["answer_start"][0]


def rebuild(text, segs, replacement, anchor):
    """Rebuild ``text`` from its words ``segs`` with ``replacement[i]`` for word i; the text
    between words is kept. Returns (new text, new position of character ``anchor``; None when
    ``anchor`` is None). ``anchor`` must not lie in a replaced word."""
    out, n, prev, new_anchor = [], 0, 0, None
    for i, (w, s, e) in enumerate(segs):
        sep = text[prev:s]
        if anchor is not None and prev <= anchor < s:
            new_anchor = n + (anchor - prev)
        out.append(sep)
        n += len(sep)
        if i in replacement:
            if anchor is not None and s <= anchor < e:
                raise ValueError("rebuild: the anchor lies in a replaced word")
            piece = replacement[i]
        else:
            piece = text[s:e]
            if anchor is not None and s <= anchor < e:
                new_anchor = n + (anchor - s)
        out.append(piece)
        n += len(piece)
        prev = e
    if anchor is not None and prev <= anchor < len(text):
        new_anchor = n + (anchor - prev)
    out.append(text[prev:])
    return "".join(out), new_anchor


def manipulate(record, strategy, *, source_text=None, filler=None, tokenizer=None, rng=None, generator=None,
               new_id=None):
    """One candidate from ``record`` by ``strategy``.

    ``record``: the question the chain starts from (a target question for ``base="target"``,
    a retrieved source question for ``base="source"``); ``source_text``: the other domain's
    passage (its words fill masked runs with probability ``mix_rate``); ``filler``: a :class:`kdfast.augment.mlm.WholeWordFiller` for the other
    masked words (without one they keep their text). Returns a new record with the same
    question and answer text and the recomputed ``answer_start``.
    """
    rng = rng or random.Random(0)
    text, start = _answer(record)
    ctx = record["context"]
    src_words = [w for w, _, _ in words(source_text, tokenizer)] if source_text else []
    src_words = [w for w in src_words if any(ch.isalnum() for ch in w)]
    for _ in range(strategy.steps):
        segs = words(ctx, tokenizer)
        end = None if text is None else start + len(text)
        free = [i for i, (w, s, e) in enumerate(segs)
                if any(ch.isalnum() for ch in w) and (text is None or e <= start or s >= end)]
        n_mask = int(round(strategy.mask_rate * len(free)))
        masked = sorted(rng.sample(free, n_mask)) if n_mask else []
        replacement = {}
        runs = [list(g) for _, g in itertools.groupby(masked, key=lambda i, c=itertools.count(): i - next(c))]
        for run in runs:
            if src_words and rng.random() < strategy.mix_rate:
                j = rng.randrange(max(1, len(src_words) - len(run) + 1))
                for k, i in enumerate(run):
                    replacement[i] = src_words[(j + k) % len(src_words)]
        rest = [i for i in masked if i not in replacement]
        if rest and filler is not None:
            pieces = tokenizer([w for w, _, _ in segs], add_special_tokens=False)["input_ids"]
            ids, slots = [tokenizer.cls_token_id], []
            rest_set = set(rest)
            for i, (w, _, _) in enumerate(segs):
                if i in rest_set:
                    ids.append(tokenizer.mask_token_id)
                    slots.append(i)
                elif i in replacement:
                    ids += tokenizer(replacement[i], add_special_tokens=False)["input_ids"]
                else:
                    ids += pieces[i]
            ids.append(tokenizer.sep_token_id)
            fills = filler.fill(ids, generator)
            for i, f in zip(slots, fills):
                if f is not None:
                    replacement[i] = tokenizer.convert_ids_to_tokens(f)
        ctx, start = rebuild(ctx, segs, replacement, start)
        if text is not None and ctx[start:start + len(text)] != text:  # cannot happen: a bug if it does
            raise AssertionError("manipulate: the answer span moved")
    out = dict(record)
    out["context"] = ctx
    out["answers"] = {"text": [] if text is None else [text], "answer_start": [] if text is None else [start]}
    out["id"] = new_id or f"{record['id']}-aug"
    out["strategy"] = dataclasses.asdict(strategy)
    out["origin"] = record["id"]
    return out


@torch.no_grad()
def embed(model, tokenizer, texts, *, batch_size=32, max_length=256):
    """Mean-pooled last hidden states ``[N, H]`` (float32, L2-normalised) of ``model``'s encoder."""
    enc_model = getattr(model, "base_model", model)
    was = enc_model.training
    enc_model.eval()
    out = []
    try:
        for b in range(0, len(texts), batch_size):
            enc = tokenizer(list(texts[b:b + batch_size]), truncation=True, max_length=max_length, padding=True,
                            return_tensors="pt")
            h = enc_model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
            m = enc["attention_mask"].unsqueeze(-1).float()
            v = (h.float() * m).sum(1) / m.sum(1).clamp(min=1)
            out.append(torch.nn.functional.normalize(v, dim=-1))
    finally:
        enc_model.train(was)
    return torch.cat(out) if out else torch.zeros(0, 1)


def retrieve(query_emb, source_emb, k):
    """Indices ``[Nq, k]`` of the ``k`` most cosine-similar source rows (embeddings normalised)."""
    k = min(k, source_emb.shape[0])
    return (query_emb @ source_emb.T).topk(k, dim=-1).indices
