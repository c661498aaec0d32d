"""Run a QA model over questions and score it: windows -> logits -> answers -> SQuAD metrics.

    result = evaluate_qa(model, tokenizer, dev_questions)
    result.metrics          # {"exact_match": ..., "f1": ...} (v2: exact, f1, HasAns_*, NoAns_*, best_*)
    result.nbest["q17"]     # [{"text", "probability", ...}, ...] the question's span distribution

Windows are sorted by length and each batch is padded to its longest window,
so evaluation computes little padding; the logits are put back in feature
order before post-processing.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time

import numpy as np
import torch

from kdfast.qa.collate import QACollator
from kdfast.qa.features import eval_features
from kdfast.qa.metrics import squad_v1_metrics, squad_v2_metrics
from kdfast.qa.postprocess import apply_null_threshold, postprocess_predictions, write_predictions

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


@dataclasses.dataclass
class QAResult:
    """What :func:`evaluate_qa` returns. ``null_scores`` is empty for SQuAD v1."""
    metrics: dict
    predictions: dict
    nbest: dict
    null_scores: dict
    start_logits: np.ndarray
    end_logits: np.ndarray
    seconds: float


def _model_device(model):
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.inference_mode()
def predict_logits(model, features, tokenizer, *, batch_size: int = 32, progress: bool = True,
                   desc: str = "predict", collator=None):
    """Start/end logits ``[n_features, L_max]`` (float32, numpy) of ``model`` over ``features``.

    Rows are in feature order; entries past a window's length are -inf. The model runs in eval
    mode (restored afterwards) on its own device.
    """
    from tqdm.auto import tqdm
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    collator = collator or QACollator(tokenizer)
    lengths = np.asarray(features["length"] if "length" in features.column_names
                         else [len(x) for x in features["input_ids"]])
    order = np.argsort(-lengths, kind="stable")
    L_max = int(collator.padded_length(int(lengths.max()))) if len(lengths) else 0
    start = np.full((len(lengths), L_max), -np.inf, dtype=np.float32)
    end = np.full_like(start, -np.inf)
    cols = [c for c in MODEL_INPUTS if c in features.column_names]
    view = features.select_columns(cols)
    device = _model_device(model)
    was_training = model.training
    model.eval()
    try:
        for b in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress, unit="batch"):
            idx = order[b:b + batch_size]
            batch = collator([view[int(i)] for i in idx])
            out = model(**{k: v.to(device) for k, v in batch.items() if k in cols})
            L = out.start_logits.shape[1]
            start[idx, :L] = out.start_logits.float().cpu().numpy()
            end[idx, :L] = out.end_logits.float().cpu().numpy()
    finally:
        model.train(was_training)
    return start, end


def score(predictions, examples, *, version_2_with_negative=False, null_scores=None) -> dict:
    """SQuAD v1.1 metrics, or v2.0 with the null-score threshold search when ``null_scores`` is given."""
    if not version_2_with_negative:
        return squad_v1_metrics(predictions, examples)
    return squad_v2_metrics(predictions, examples, na_probs=null_scores or None)


def evaluate_qa(model, tokenizer, examples, *, features=None, max_seq_length: int = 384, doc_stride: int = 128,
                batch_size: int = 32, version_2_with_negative: bool = False, n_best_size: int = 20,
                max_answer_length: int = 30, null_score_diff_threshold: float = 0.0, output_dir: str | None = None,
                progress: bool = True, prefix: str = "eval") -> QAResult:
    """Predict and score ``examples`` (a questions ``Dataset`` with gold ``answers``).

    ``features``: precomputed evaluation windows (else made here). For v2, the metrics include
    ``best_f1`` / ``best_f1_thresh`` from a search over the per-question null-score differences
    (usable as ``null_score_diff_threshold`` next time). With ``output_dir``, writes
    ``predictions.json``, ``nbest_predictions.json`` and ``metrics.json`` (``prefix``-ed keys).
    """
    t0 = time.perf_counter()
    if features is None:
        features = eval_features(examples, tokenizer, max_seq_length=max_seq_length, doc_stride=doc_stride)
    start, end = predict_logits(model, features, tokenizer, batch_size=batch_size, progress=progress,
                                desc=f"{prefix}: predict")
    preds, nbest, null_scores = postprocess_predictions(
        examples, features, start, end, version_2_with_negative=version_2_with_negative, n_best_size=n_best_size,
        max_answer_length=max_answer_length, null_score_diff_threshold=null_score_diff_threshold)
    metrics = score(preds, examples, version_2_with_negative=version_2_with_negative, null_scores=null_scores)
    seconds = time.perf_counter() - t0
    metrics = dict(metrics)
    metrics["seconds"] = seconds
    metrics["questions_per_second"] = len(examples) / seconds if seconds > 0 else float("nan")
    if output_dir:
        write_predictions(output_dir, preds, nbest, null_scores)
        with open(os.path.join(output_dir, "metrics.json"), "w") as fh:
            json.dump({f"{prefix}_{k}": v for k, v in metrics.items()}, fh, indent=2)
    return QAResult(metrics, preds, nbest, null_scores, start, end, seconds)


__all__ = ["QAResult", "predict_logits", "evaluate_qa", "score", "apply_null_threshold"]
