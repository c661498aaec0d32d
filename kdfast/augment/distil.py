"""The student's training and scoring inside the augmentation loop.

A short, self-contained loop (AdamW, fresh per call) rather than a ``transformers.Trainer``
per episode: an episode distils a few steps on a few dozen windows, where Trainer's setup
costs more than the steps, and a call that owns its optimizer and its seed is what makes
the loop's checkpoints exact (a resumed run repeats the same calls with the same seeds).
The loss is :func:`kdfast.ops.qa_kd_loss.qa_kd_loss` over the span tokens (CLS + context),
exactly as :class:`kdfast.distill.DistillationTrainer` computes it.
"""
from __future__ import annotations

import random

import torch

from kdfast.augment.data import batches, collate, forward
from kdfast.distill.collate import span_mask
from kdfast.ops.kd_loss import kd_loss
from kdfast.ops.qa_kd_loss import qa_kd_loss


def train_steps(model, windows, tokenizer, *, steps, batch_size=16, learning_rate=1e-3, seed=0,
                temperature=2.0, alpha=0.5, weight_decay=0.01):
    """``steps`` optimizer steps on ``windows`` (cycled, shuffled with ``seed``).

    Windows with ``teacher_start`` get ``alpha * KD + (1 - alpha) * CE``; windows without
    teacher rows (fine-tuning a teacher) CE only. MixKD windows (``mix_input_ids``) have no
    hard label and are trained on the teacher's soft labels only. Returns the mean loss.
    """
    if steps <= 0 or not windows:
        return float("nan")
    torch.manual_seed(seed)  # dropout masks
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=weight_decay)
    warm = max(1, int(0.1 * steps))  # linear warm-up over 10% of the steps, then linear decay
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * max(0.0, 1 - s / steps))
    model.train()
    done, total = 0, 0.0
    while done < steps:
        for chunk in batches(windows, batch_size, rng):
            batch = collate(tokenizer, chunk)
            out = forward(model, batch)
            L = batch["input_ids"].shape[1]
            mask = span_mask(batch, L)
            sp, ep = batch["start_positions"], batch["end_positions"]
            if "mix_lambda" in batch:
                sp = torch.where(batch["mix_lambda"] < 1, L, sp)  # mixed rows: no hard label
                ep = torch.where(batch["mix_lambda"] < 1, L, ep)
            s, e = out.start_logits, out.end_logits
            if "teacher_start_logits" in batch:
                loss = qa_kd_loss(s, e, batch["teacher_start_logits"], batch["teacher_end_logits"], sp, ep,
                                  temperature=temperature, soft_weight=alpha, hard_weight=1.0 - alpha,
                                  mask=mask)
            else:
                loss = qa_kd_loss(s, e, s.detach(), e.detach(), sp, ep, soft_weight=0.0, hard_weight=1.0,
                                  mask=mask)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            total += float(loss.detach())
            done += 1
            if done >= steps:
                break
    return total / done


def _eval_batches(model, tokenizer, windows, batch_size, *, drop_teacher=False):
    """Yield ``(chunk, batch, outputs, span mask)`` over ``windows`` with ``model`` in eval mode
    (its training mode is restored afterwards). Call it under ``torch.no_grad()``."""
    was = model.training
    model.eval()
    try:
        for b in range(0, len(windows), batch_size):
            chunk = windows[b:b + batch_size]
            rows = [{k: v for k, v in w.items() if not k.startswith("teacher_")} for w in chunk] if drop_teacher \
                else chunk
            batch = collate(tokenizer, rows)
            yield chunk, batch, forward(model, batch), span_mask(batch, batch["input_ids"].shape[1])
    finally:
        model.train(was)


@torch.no_grad()
def mean_loss(model, windows, tokenizer, *, temperature=2.0, alpha=0.5, batch_size=32):
    """The training loss of :func:`train_steps` (``alpha * KD + (1 - alpha) * CE`` over the span
    tokens) on ``windows`` with teacher rows, in eval mode (no dropout), averaged over windows."""
    total = 0.0
    for chunk, batch, out, mask in _eval_batches(model, tokenizer, windows, batch_size):
        loss = qa_kd_loss(out.start_logits, out.end_logits, batch["teacher_start_logits"],
                          batch["teacher_end_logits"], batch["start_positions"], batch["end_positions"],
                          temperature=temperature, soft_weight=alpha, hard_weight=1.0 - alpha, mask=mask)
        total += float(loss) * len(chunk)
    return total / max(1, len(windows))


@torch.no_grad()
def span_stats(model, tokenizer, windows, batch_size=32):
    """Per window: ``{"conf_start", "conf_end", "ent_start", "ent_end"}`` of ``model``'s span
    distributions (max probability and entropy in nats over CLS + context tokens)."""
    out_rows = []
    for chunk, _, out, mask in _eval_batches(model, tokenizer, windows, batch_size, drop_teacher=True):
        row = {}
        for name, logit in (("start", out.start_logits), ("end", out.end_logits)):
            logp = logit.float().masked_fill(~mask, float("-inf")).log_softmax(-1)
            p = logp.exp()
            row[f"conf_{name}"] = p.max(-1).values
            row[f"ent_{name}"] = -(p * logp.masked_fill(~mask, 0.0)).sum(-1)
        for i in range(len(chunk)):
            out_rows.append({k: float(v[i]) for k, v in row.items()})
    return out_rows


@torch.no_grad()
def teacher_student_kl(student, tokenizer, windows, temperature=1.0, batch_size=32):
    """Per window ``KL(teacher || student)`` averaged over the start and end heads, computed with
    the fused :func:`kdfast.ops.kd_loss.kd_loss` (``reduction="none"``) over the span tokens."""
    vals = []
    for chunk, batch, out, mask in _eval_batches(student, tokenizer, windows, batch_size):
        s = torch.cat([out.start_logits, out.end_logits]).float()
        t = torch.cat([batch["teacher_start_logits"], batch["teacher_end_logits"]]).float()
        m = torch.cat([mask, mask])
        # Masked tokens get a large negative logit in both (no mass; finite so the kernel's
        # arithmetic stays finite).
        rows = kd_loss(s.masked_fill(~m, -1e4), t.masked_fill(~m, -1e4), temperature=temperature,
                       reduction="none", scale_by_t2=False)
        n = len(chunk)
        vals += (0.5 * (rows[:n] + rows[n:])).tolist()
    return vals


class Scorer:
    """F1 / EM of a model on fixed questions (windows made once)."""

    def __init__(self, records, tokenizer, max_seq_length=256, doc_stride=96):
        from datasets import Dataset
        from kdfast.qa.features import eval_features

        self.tokenizer = tokenizer
        self.max_seq_length, self.doc_stride = max_seq_length, doc_stride
        cols = ("id", "title", "context", "question", "answers")
        self.examples = Dataset.from_list([{k: r.get(k, "") for k in cols} for r in records])
        self.features = eval_features(self.examples, tokenizer, max_seq_length=max_seq_length,
                                      doc_stride=doc_stride, load_from_cache=False)

    def __call__(self, model) -> dict:
        from kdfast.qa.evaluate import evaluate_qa

        res = evaluate_qa(model, self.tokenizer, self.examples, features=self.features, progress=False,
                          max_seq_length=self.max_seq_length, doc_stride=self.doc_stride)
        return {"f1": float(res.metrics["f1"]), "exact_match": float(res.metrics["exact_match"])}
