"""The masked language model that refills corrupted passages.

For the built-in data a small BERT MLM is built in code (the QA tokenizer's vocabulary) and
trained for a few hundred steps on source + target text. With a pretrained teacher (real data,
a 30k-entry vocabulary) that small model learns little more than word frequencies in a few hundred
steps; ``build_mlm(init=<teacher dir>)`` starts it from the teacher's pretrained encoder instead
(word embeddings tied to the output layer, a new prediction head). Any local MLM directory
(``AutoModelForMaskedLM``, same tokenizer) works as well.
"""
from __future__ import annotations

import random

import torch


def build_mlm(tokenizer, *, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256,
              max_position_embeddings=512, seed=0, init=None):
    """A BERT masked LM for ``tokenizer``: built from the size arguments, or, with ``init`` (a saved
    BERT-family model directory: a pretrained encoder or a QA model fine-tuned from one, e.g. the
    teacher), that model's encoder with its word embeddings tied to the output layer and a freshly
    initialised prediction transform (the size arguments are then unused)."""
    from transformers import BertConfig, BertForMaskedLM

    if init is not None:
        import os

        if not os.path.exists(os.path.join(init, "config.json")):
            raise FileNotFoundError(f"mlm_init: no model directory (config.json) at {init}")
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(init)
        if not isinstance(cfg, BertConfig):
            raise ValueError(f"mlm_init: {init} is a {cfg.model_type!r} model; a BERT-family encoder is needed")
        if cfg.vocab_size != len(tokenizer):
            raise ValueError(f"mlm_init: {init} has a {cfg.vocab_size}-entry vocabulary, the tokenizer "
                             f"{len(tokenizer)}: use the tokenizer the model was trained with")
        cfg.tie_word_embeddings = True
        from transformers.utils import logging as hf_logging

        torch.manual_seed(seed)
        level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # the new head and the dropped QA head are expected, not a warning
        try:
            mlm = BertForMaskedLM.from_pretrained(init, config=cfg)
        finally:
            hf_logging.set_verbosity(level)
        mlm.tie_weights()
        return mlm

    cfg = BertConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
                     num_attention_heads=num_attention_heads, intermediate_size=intermediate_size,
                     max_position_embeddings=max_position_embeddings, pad_token_id=tokenizer.pad_token_id,
                     type_vocab_size=2)
    torch.manual_seed(seed)
    return BertForMaskedLM(cfg)


def masked_lm_loss(model, input_ids, attention_mask, labels):
    """The masked-LM loss (mean cross-entropy over the positions whose label is not -100).

    For a ``BertForMaskedLM`` the vocabulary head runs on the masked positions only (about 15%
    of the tokens): the same value as ``model(..., labels=labels).loss`` without the
    ``tokens x vocab`` logits of every other position, which dominate the step time with a
    30k-entry vocabulary. Other masked LMs take the plain path."""
    if not (hasattr(model, "bert") and hasattr(model, "cls")):
        return model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
    hidden = model.bert(input_ids=input_ids, attention_mask=attention_mask)[0]
    picked = labels != -100
    logits = model.cls(hidden[picked])
    return torch.nn.functional.cross_entropy(logits, labels[picked])


def train_mlm(model, tokenizer, texts, *, steps=300, batch_size=16, max_length=128, mask_rate=0.15,
              learning_rate=2e-3, seed=0):
    """BERT masked-LM training (``mask_rate`` of the tokens, 80/10/10 rule) on chunks of ``texts``.

    Returns the mean loss of the last 20 steps."""
    if not texts:
        raise ValueError("train_mlm: no text")
    rng = random.Random(seed)
    torch.manual_seed(seed)
    body = max_length - 2
    chunks = []
    for t in texts:
        ids = tokenizer(t, add_special_tokens=False)["input_ids"]
        for b in range(0, max(len(ids), 1), body):
            part = ids[b:b + body]
            if len(part) >= 8:
                chunks.append([tokenizer.cls_token_id] + part + [tokenizer.sep_token_id])
    if not chunks:
        raise ValueError("train_mlm: texts too short")
    special = set(tokenizer.all_special_ids)
    V = len(tokenizer)
    opt = torch.optim.AdamW(model.parameters(), lr=learning_rate)
    model.train()
    losses = []
    for _ in range(steps):
        picked = [chunks[rng.randrange(len(chunks))] for _ in range(batch_size)]
        L = max(len(c) for c in picked)
        ids = torch.full((batch_size, L), tokenizer.pad_token_id, dtype=torch.long)
        att = torch.zeros(batch_size, L, dtype=torch.long)
        for i, c in enumerate(picked):
            ids[i, :len(c)] = torch.tensor(c)
            att[i, :len(c)] = 1
        labels = torch.full_like(ids, -100)
        inp = ids.clone()
        for i, c in enumerate(picked):
            for j, tok in enumerate(c):
                if tok in special or rng.random() >= mask_rate:
                    continue
                labels[i, j] = tok
                u = rng.random()
                inp[i, j] = tokenizer.mask_token_id if u < 0.8 else (rng.randrange(V) if u < 0.9 else tok)
        loss = masked_lm_loss(model, inp, att, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    model.eval()
    tail = losses[-20:]
    return sum(tail) / len(tail)


def load_mlm(path):
    from transformers import AutoModelForMaskedLM

    return AutoModelForMaskedLM.from_pretrained(path).eval()


class WholeWordFiller:
    """Fills ``[MASK]`` slots with whole-word vocabulary entries (no ``##`` pieces, no specials,
    no punctuation-only tokens), sampled from the MLM's top-``top_k`` at ``temperature``."""

    def __init__(self, mlm, tokenizer, *, top_k=10, temperature=1.0):
        self.mlm, self.tok, self.top_k, self.temperature = mlm.eval(), tokenizer, top_k, temperature
        vocab = tokenizer.get_vocab()
        allowed = torch.zeros(len(tokenizer), dtype=torch.bool)
        for piece, i in vocab.items():
            if i < len(tokenizer) and not piece.startswith("##") and piece not in tokenizer.all_special_tokens \
                    and any(ch.isalnum() for ch in piece):
                allowed[i] = True
        self.allowed = allowed

    @torch.no_grad()
    def fill(self, ids, generator):
        """``ids``: list of token ids with mask ids; returns the ids of the masked slots, in order."""
        mask_id = self.tok.mask_token_id
        x = torch.tensor([ids[:512]])
        slots = [j for j, t in enumerate(ids[:512]) if t == mask_id]
        if hasattr(self.mlm, "bert") and hasattr(self.mlm, "cls"):  # vocabulary head on the slots only
            hidden = self.mlm.bert(input_ids=x, attention_mask=torch.ones_like(x))[0][0]
            rows = dict(zip(slots, self.mlm.cls(hidden[slots]).float()))
        else:
            logits = self.mlm(input_ids=x, attention_mask=torch.ones_like(x)).logits[0].float()
            rows = {j: logits[j] for j in slots}
        out = []
        for j, t in enumerate(ids):
            if t != mask_id:
                continue
            if j not in rows:  # past the MLM's 512 positions
                out.append(None)
                continue
            row = rows[j].masked_fill(~self.allowed, float("-inf"))
            top = row.topk(self.top_k)
            p = (top.values / self.temperature).softmax(-1)
            out.append(int(top.indices[torch.multinomial(p, 1, generator=generator)]))
        return out
