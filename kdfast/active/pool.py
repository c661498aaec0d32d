"""Scoring the unlabeled pool: model outputs -> the :class:`~kdfast.active.strategies.PoolView` a strategy reads.

    view = score_pool(student, tok, pool_questions, pool_windows=windows, strategy="margin")
    ids = select_queries(get_strategy("margin"), view, 100, rng)

Everything is per QUESTION (a question's windows are combined): the n-best
list across all its windows (post-processing already ranks the spans of all
windows together), MC-dropout n-best lists, a pooled embedding of its first
window, and per-window start/end logits over CLS + context tokens.

The student is scored through ``kdfast.distill.models.inference_ready`` (kdfast
attention + the unpadded encoder: padded tokens cost nothing); a model that
cannot be unpadded (e.g. ``attn_implementation="sdpa"``) runs its stock forward.

Sharding (torchrun / accelerate): when ``torch.distributed`` is initialised
with world size W, rank r scores the questions ``r::W`` (whole questions, so a
question's windows never split), rank 0 gathers the results
(``gather_object``) and returns the PoolView; other ranks return ``None``.
:func:`select_queries` selects on rank 0 and broadcasts the ids to every rank.
"""
from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn

from kdfast.active.strategies import POOL_FIELDS, PoolView, Strategy, get_strategy

SCORABLE = ("nbest", "mc_nbest", "embeddings", "labeled_embeddings", "student_logits", "teacher_logits")
_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of the initialised ``torch.distributed`` group, else ``(0, 1)``."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _DropoutOn(nn.Module):
    """Wraps a model so that ``eval()`` leaves its dropout active (MC-dropout passes through
    :func:`kdfast.qa.evaluate.predict_logits`, which puts the model in eval mode)."""

    def __init__(self, model):
        super().__init__()
        self.inner = model

    def train(self, mode: bool = True):
        self.training = True
        self.inner.train(True)
        return self

    def forward(self, **kw):
        return self.inner(**kw)


def _windows_of(windows, example_ids):
    """Rows of ``windows`` (eval features) of the given questions, in question order."""
    from kdfast.qa.features import windows_per_example
    groups = windows_per_example(windows)
    missing = [q for q in example_ids if q not in groups]
    if missing:
        raise ValueError(f"pool_windows has no windows for questions {missing[:5]} "
                         f"({len(missing)} of {len(example_ids)}): were they made from other questions?")
    rows = [r for q in example_ids for r in groups[q]]
    return windows.select(rows)


def _segment_index(cls, c0, c1):
    return np.concatenate([[int(cls)], np.arange(int(c0), int(c1) + 1)])


def _per_window_logits(windows, start, end) -> dict:
    """``{qid: [(start_seg, end_seg), ...]}`` restricted to CLS + context tokens, windows in order."""
    out: dict = {}
    cols = zip(windows["example_id"], windows["cls_index"], windows["context_start"], windows["context_end"])
    for row, (q, cls, c0, c1) in enumerate(cols):
        idx = _segment_index(cls, c0, c1)
        out.setdefault(q, []).append((start[row, idx].astype(np.float32), end[row, idx].astype(np.float32)))
    return out


def _strip(nbest: dict) -> dict:
    return {q: [{k: e[k] for k in ("text", "probability", "start_logit", "end_logit") if k in e} for e in v]
            for q, v in nbest.items()}


@torch.inference_mode()
def embed_questions(model, tokenizer, windows, *, batch_size: int = 64) -> np.ndarray:
    """``[n_questions, hidden]`` float32: the base encoder's last hidden state mean-pooled over
    the context tokens of each question's first window (questions in ``windows`` order).

    ``windows``: evaluation windows (:func:`kdfast.qa.eval_features`). The encoder is
    ``getattr(model, model.base_model_prefix)`` (the QA head is not used).
    """
    from kdfast.qa.collate import QACollator
    base = getattr(model, model.base_model_prefix, model)
    first = [i for i, w in enumerate(windows["window"]) if w == 0]
    if not first:
        return np.zeros((0, int(model.config.hidden_size)), dtype=np.float32)
    cols = [c for c in _INPUTS if c in windows.column_names]
    view = windows.select(first).select_columns(cols + ["context_start", "context_end", "length"])
    lengths = np.asarray(view["length"])
    order = np.argsort(-lengths, kind="stable")
    collate = QACollator(tokenizer)
    device = next(model.parameters()).device
    out = None
    was_training = model.training
    model.eval()
    try:
        for b in range(0, len(order), batch_size):
            idx = order[b:b + batch_size]
            batch = collate([view[int(i)] for i in idx])
            hidden = base(**{k: batch[k].to(device) for k in cols}).last_hidden_state.float()
            L = hidden.shape[1]
            pos = torch.arange(L, device=device)[None, :]
            m = (pos >= batch["context_start"].to(device)[:, None]) & (pos <= batch["context_end"].to(device)[:, None])
            m = m.float().unsqueeze(-1)
            pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1)
            if out is None:
                out = np.zeros((len(order), pooled.shape[1]), dtype=np.float32)
            out[idx] = pooled.cpu().numpy()
    finally:
        model.train(was_training)
    return out


def _teacher_table(teacher_logits, windows) -> dict:
    """Teacher logits per question/window from a TeacherCache, a Dataset with cache columns, or a dict."""
    if isinstance(teacher_logits, dict):
        ids = list(dict.fromkeys(windows["example_id"]))
        missing = [q for q in ids if q not in teacher_logits]
        if missing:
            raise ValueError(f"teacher_logits has no entry for questions {missing[:5]}")
        return {q: teacher_logits[q] for q in ids}
    ds = getattr(teacher_logits, "dataset", teacher_logits)  # TeacherCache or a Dataset
    if not hasattr(ds, "column_names") or "teacher_start" not in ds.column_names:
        raise ValueError("teacher_logits must be a TeacherCache, a Dataset with teacher_start / teacher_end "
                         f"columns, or {{qid: [(start, end), ...]}}; got {type(teacher_logits).__name__}")
    key = {(e, w): r for r, (e, w) in enumerate(zip(ds["example_id"], ds["window"]))}
    want = list(zip(windows["example_id"], windows["window"]))
    missing = [k for k in want if k not in key]
    if missing:
        raise ValueError(f"the teacher cache has no rows for windows {missing[:3]} (built for other windows, or "
                         "another max_seq_length / doc_stride)")
    rows = ds.select([key[k] for k in want])
    has_idx = "teacher_start_idx" in rows.column_names
    out: dict = {}
    for i, (q, cls, c0, c1) in enumerate(zip(windows["example_id"], windows["cls_index"], windows["context_start"],
                                             windows["context_end"])):
        n = int(c1) - int(c0) + 2
        r = rows[i]
        pair = []
        for side in ("start", "end"):
            v = np.asarray(r[f"teacher_{side}"], dtype=np.float32)
            if has_idx:  # top-k cache: the other tokens get no teacher mass
                full = np.full(n, -np.inf, dtype=np.float32)
                full[np.asarray(r[f"teacher_{side}_idx"], dtype=np.int64)] = v
                v = full
            if v.size != n:
                raise ValueError(f"teacher cache row for question {q!r}: {v.size} logits for a window with {n} "
                                 "CLS + context tokens")
            pair.append(v)
        out.setdefault(q, []).append(tuple(pair))
    return out


def _score_local(model, tokenizer, questions, windows, labeled, needs, *, teacher, teacher_logits, batch_size,
                 mc_passes, seed, rank, max_seq_length, doc_stride, post_kw, progress):
    from kdfast.qa.evaluate import predict_logits
    from kdfast.qa.features import eval_features
    from kdfast.qa.postprocess import postprocess_predictions
    res = {"ids": list(questions["id"])}
    if needs & {"nbest", "student_logits"}:
        s, e = predict_logits(model, windows, tokenizer, batch_size=batch_size, progress=progress,
                              desc="score pool")
        if "nbest" in needs:
            _, nbest, _ = postprocess_predictions(questions, windows, s, e, **post_kw)
            res["nbest"] = _strip(nbest)
        if "student_logits" in needs:
            res["student_logits"] = _per_window_logits(windows, s, e)
    if "mc_nbest" in needs:
        if mc_passes < 1:
            raise ValueError(f"mc_passes must be >= 1, got {mc_passes}")
        was_training = model.training
        dev = next(model.parameters()).device
        devices = [dev.index or 0] if dev.type == "cuda" else []
        passes = []
        try:
            with torch.random.fork_rng(devices=devices):
                for t in range(mc_passes):
                    torch.manual_seed(seed * 100_003 + 1_000 * rank + t)  # per rank: shards draw other masks
                    s, e = predict_logits(_DropoutOn(model), windows, tokenizer, batch_size=batch_size,
                                          progress=progress, desc=f"MC dropout {t + 1}/{mc_passes}")
                    passes.append(_strip(postprocess_predictions(questions, windows, s, e, **post_kw)[1]))
        finally:
            model.train(was_training)
        res["mc_nbest"] = passes
    if "embeddings" in needs:
        res["embeddings"] = embed_questions(model, tokenizer, windows, batch_size=batch_size)
    if "labeled_embeddings" in needs and labeled is not None:
        res["labeled_ids"] = list(labeled["id"])
        if len(labeled):
            lw = eval_features(labeled, tokenizer, max_seq_length=max_seq_length, doc_stride=doc_stride)
            res["labeled_embeddings"] = embed_questions(model, tokenizer, lw, batch_size=batch_size)
        else:
            res["labeled_embeddings"] = None
    if "teacher_logits" in needs:
        if teacher_logits is not None:
            res["teacher_logits"] = _teacher_table(teacher_logits, windows)
        else:
            from kdfast.distill.models import inference_ready
            ts, te = predict_logits(inference_ready(teacher), windows, tokenizer, batch_size=batch_size,
                                    progress=progress, desc="teacher logits")
            res["teacher_logits"] = _per_window_logits(windows, ts, te)
    return res


def _merge(parts, ids, labeled_ids, needs, hidden):
    """Rank 0: the shards' results back in pool order."""
    out = {"ids": ids}
    for name in ("nbest", "student_logits", "teacher_logits"):
        if name in needs:
            table = {}
            for p in parts:
                table.update(p[name])
            out[name] = {q: table[q] for q in ids}
    if "mc_nbest" in needs:
        T = len(parts[0]["mc_nbest"])
        out["mc_nbest"] = [{q: v for p in parts for q, v in p["mc_nbest"][t].items()} for t in range(T)]
    if "embeddings" in needs:
        row = {q: e for p in parts for q, e in zip(p["ids"], p["embeddings"])}
        out["embeddings"] = np.stack([row[q] for q in ids]).astype(np.float32) if ids else \
            np.zeros((0, hidden), np.float32)
    if "labeled_embeddings" in needs and "labeled_ids" in parts[0]:
        row = {q: e for p in parts if p["labeled_embeddings"] is not None
               for q, e in zip(p["labeled_ids"], p["labeled_embeddings"])}
        out["labeled_embeddings"] = np.stack([row[q] for q in labeled_ids]).astype(np.float32) if labeled_ids else \
            np.zeros((0, hidden), np.float32)
    return out


def score_pool(model, tokenizer, pool_questions, *, pool_windows=None, labeled_questions=None, teacher=None,
               teacher_logits=None, strategy, fields=(), batch_size: int = 64, mc_passes: int = 5,
               max_seq_length: int = 384, doc_stride: int = 128, seed: int = 0, version_2_with_negative=False,
               n_best_size: int = 20, max_answer_length: int = 30, progress: bool = True,
               return_stats: bool = False):
    """Compute the PoolView fields that ``strategy`` needs, one entry per pool question.

    Args:
        model: the student (a HF QA model); scored in eval mode through ``inference_ready``
            (its mode is restored afterwards).
        tokenizer: its fast tokenizer.
        pool_questions: questions ``Dataset`` (``id``, ``context``, ``question``) of the unlabeled pool.
        pool_windows: their evaluation windows (:func:`kdfast.qa.eval_features`, may hold more
            questions); made here when None.
        labeled_questions: the labeled questions (for ``labeled_embeddings``, read by coreset / hybrid).
        teacher: teacher model for ``teacher_logits`` (when ``teacher_logits`` is not given).
        teacher_logits: precomputed teacher logits: a :class:`kdfast.distill.TeacherCache` (or its
            Dataset) over the same windows, or ``{qid: [(start, end), ...]}``.
        strategy: a :class:`Strategy` or a registered name; its ``needs`` say what to compute.
        fields: extra PoolView fields to compute besides ``strategy.needs``.
        mc_passes: MC-dropout passes for ``mc_nbest`` (seeded by ``seed`` and the rank; the global
            RNG state is left as it was).
        version_2_with_negative, n_best_size, max_answer_length: post-processing options.
        return_stats: also return ``{"questions", "seconds", "questions_per_s", "fields"}``.

    Returns:
        the :class:`PoolView` (``ids`` in pool order); ``None`` on ranks other than 0 when sharded.
        With ``return_stats``: ``(view, stats)``.
    """
    import torch.distributed as dist
    from kdfast.distill.models import inference_ready
    from kdfast.qa.features import eval_features
    t0 = time.perf_counter()
    if isinstance(strategy, str):
        strategy = get_strategy(strategy)
    if not isinstance(strategy, Strategy):
        raise ValueError(f"strategy must be a Strategy or a registered name, got {strategy!r}")
    needs = set(strategy.needs) | set(fields)
    unknown = needs - set(POOL_FIELDS)
    if unknown:
        raise ValueError(f"unknown PoolView fields {sorted(unknown)}; fields are {', '.join(POOL_FIELDS)}")
    if needs - set(SCORABLE):
        raise ValueError(f"score_pool cannot compute {sorted(needs - set(SCORABLE))} (strategy {strategy.name!r}); "
                         f"it computes {', '.join(SCORABLE)}")
    if "embeddings" in needs and labeled_questions is not None:
        needs.add("labeled_embeddings")
    if "teacher_logits" in needs and teacher is None and teacher_logits is None:
        raise ValueError(f"strategy {strategy.name!r} needs teacher_logits: pass teacher= or teacher_logits=")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    ids = list(pool_questions["id"])
    rank, size = world()
    local_idx = list(range(rank, len(ids), size))
    local_q = pool_questions.select(local_idx) if size > 1 else pool_questions
    if pool_windows is None:
        local_w = eval_features(local_q, tokenizer, max_seq_length=max_seq_length, doc_stride=doc_stride)
    else:
        if "offset_mapping" not in pool_windows.column_names:
            raise ValueError("pool_windows must be evaluation windows (kdfast.qa.eval_features: offset_mapping)")
        local_w = _windows_of(pool_windows, list(local_q["id"]))
    local_lab = None
    if labeled_questions is not None and "labeled_embeddings" in needs:
        local_lab = labeled_questions.select(range(rank, len(labeled_questions), size)) if size > 1 \
            else labeled_questions
    was_training = model.training
    inference_ready(model)
    try:
        part = _score_local(model, tokenizer, local_q, local_w, local_lab, needs, teacher=teacher,
                            teacher_logits=teacher_logits, batch_size=batch_size, mc_passes=mc_passes, seed=seed,
                            rank=rank, max_seq_length=max_seq_length, doc_stride=doc_stride,
                            post_kw=dict(version_2_with_negative=version_2_with_negative, n_best_size=n_best_size,
                                         max_answer_length=max_answer_length), progress=progress)
    finally:
        model.train(was_training)
    if size > 1:
        parts = [None] * size if rank == 0 else None
        dist.gather_object(part, parts, dst=0)
        if rank != 0:
            return (None, None) if return_stats else None
    else:
        parts = [part]
    labeled_ids = list(labeled_questions["id"]) if local_lab is not None else []
    merged = _merge(parts, ids, labeled_ids, needs, int(getattr(model.config, "hidden_size", 0)))
    view = PoolView(**merged)
    seconds = time.perf_counter() - t0
    computed = sorted(needs & set(merged))
    stats = {"questions": len(ids), "seconds": seconds, "fields": computed,
             "questions_per_s": (len(ids) / seconds if computed and seconds > 0 else None)}
    return (view, stats) if return_stats else view


def select_queries(strategy, view, n: int, rng) -> list[str]:
    """``strategy.select(view, n, rng)`` on rank 0, broadcast to every rank (``broadcast_object_list``).

    ``view`` may be ``None`` on ranks other than 0 (what :func:`score_pool` returns there).
    """
    import torch.distributed as dist
    if isinstance(strategy, str):
        strategy = get_strategy(strategy)
    rank, size = world()
    picked = strategy.select(view, n, rng) if rank == 0 else None
    if size > 1:
        box = [picked]
        dist.broadcast_object_list(box, src=0)
        picked = box[0]
    return list(picked)


__all__ = ["score_pool", "select_queries", "embed_questions", "world", "SCORABLE"]
