"""Size and CPU speed of a QA model, measured the same way for every row of a results table.

Latency per question: the windows of one question as one batch (a user asking
one question), median over ``n_questions`` questions after a warm-up.
Throughput: questions per second over the same questions in batches of
``batch_size`` windows, sorted by length (what ``kdfast eval`` does).
"""
from __future__ import annotations

import statistics
import time

import torch

from kdfast.qa.collate import QACollator
from kdfast.qa.features import windows_per_example

_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


@torch.inference_mode()
def cpu_speed(model, features, tokenizer, *, n_questions: int = 64, batch_size: int = 32, warmup: int = 3,
              threads: int | None = None) -> dict:
    """``{"latency_ms": median ms per question, "questions_per_s": throughput}`` on the first
    ``n_questions`` questions of ``features`` (evaluation windows)."""
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        model.eval()
        groups = list(windows_per_example(features).values())[:n_questions]
        cols = [c for c in _INPUTS if c in features.column_names]
        view = features.select_columns(cols)
        collate = QACollator(tokenizer)
        batches = [collate([view[i] for i in g]) for g in groups]
        for b in batches[:warmup]:
            model(**b)
        times = []
        for b in batches:
            t0 = time.perf_counter()
            model(**b)
            times.append(time.perf_counter() - t0)
        flat = sorted((i for g in groups for i in g), key=lambda i: -len(view[i]["input_ids"]))
        big = [collate([view[i] for i in flat[k:k + batch_size]]) for k in range(0, len(flat), batch_size)]
        t0 = time.perf_counter()
        for b in big:
            model(**b)
        total = time.perf_counter() - t0
        return {"latency_ms": 1000 * statistics.median(times), "questions_per_s": len(groups) / total}
    finally:
        torch.set_num_threads(old_threads)
