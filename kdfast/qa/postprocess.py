"""Start/end logits of windows -> answers per question (HF ``utils_qa.py`` rules).

For every question, the ``n_best_size`` best start and end tokens of each of
its windows are paired; a pair is a candidate when both tokens are context
tokens, ``end >= start`` and the span has at most ``max_answer_length``
tokens. Candidates of all windows are ranked by ``start_logit + end_logit``;
the best ``n_best_size`` make the question's n-best list, whose
``probability`` is the softmax of those scores (the span distribution that
the active-learning strategies read).

SQuAD v2: the null (no-answer) score of a question is the smallest
``start_logit[CLS] + end_logit[CLS]`` over its windows; the prediction is ""
when ``null_score - best_span_score > null_score_diff_threshold``. That
difference is returned per question (``null_scores``) so that the threshold
is searched on dev (:func:`best_null_threshold`) instead of fixed at 0.
"""
from __future__ import annotations

import collections
import json
import os

import numpy as np

from kdfast.qa.features import windows_per_example


def _offset_arrays(features):
    """``[n_features, L, 2]`` int64 char offsets (-1 outside the context) from a Dataset or list of dicts."""
    try:
        from datasets import Dataset
    except ImportError:  # pragma: no cover
        Dataset = ()
    if isinstance(features, Dataset):
        import pyarrow as pa
        import pyarrow.compute as pc
        col = features.data.column("offset_mapping").combine_chunks()
        if isinstance(col, pa.ChunkedArray):
            col = col.combine_chunks()
        starts = col.offsets.to_numpy()
        inner = col.flatten()  # per-token [a, b] or null
        valid = inner.is_valid().to_numpy(zero_copy_only=False)
        vals = pc.list_flatten(inner).to_numpy(zero_copy_only=False).reshape(-1, 2)
        tok = np.full((len(inner), 2), -1, dtype=np.int64)
        tok[valid] = vals
        L = int(np.max(np.diff(starts))) if len(starts) > 1 else 0
        out = np.full((len(features), L, 2), -1, dtype=np.int64)
        for i in range(len(features)):
            a, b = starts[i], starts[i + 1]
            out[i, :b - a] = tok[a:b]
        return out
    L = max((len(f["offset_mapping"]) for f in features), default=0)
    out = np.full((len(features), L, 2), -1, dtype=np.int64)
    for i, f in enumerate(features):
        for k, o in enumerate(f["offset_mapping"]):
            if o is not None and len(o) >= 2:
                out[i, k] = o[:2]
    return out


def _column(features, name):
    return features[name] if not isinstance(features, list) else [f[name] for f in features]


def _window_candidates(start, end, offs, n_best, max_len):
    """Valid (start, end, score) candidates of one window in run_qa.py's order."""
    L = min(len(start), offs.shape[0])
    start, end = start[:L], end[:L]
    si = np.argsort(start)[-1:-n_best - 1:-1]
    ei = np.argsort(end)[-1:-n_best - 1:-1]
    s_idx = np.repeat(si, len(ei))  # start-major, like the nested loops of utils_qa.py
    e_idx = np.tile(ei, len(si))
    ok = (offs[s_idx, 0] >= 0) & (offs[e_idx, 0] >= 0) & (e_idx >= s_idx) & (e_idx - s_idx + 1 <= max_len)
    s_idx, e_idx = s_idx[ok], e_idx[ok]
    return s_idx, e_idx, start[s_idx] + end[e_idx]


def postprocess_predictions(examples, features, start_logits, end_logits, *, version_2_with_negative: bool = False,
                            n_best_size: int = 20, max_answer_length: int = 30,
                            null_score_diff_threshold: float = 0.0):
    """Answers of every question from the logits of its windows.

    Same rules and ranking as HF ``utils_qa.postprocess_qa_predictions``, except that the
    null score is read at each window's ``cls_index`` (HF reads token 0, which is the CLS
    token only for right-padding models), and the work per window is vectorised (the
    10,570-question SQuAD dev set takes about a second).

    Args:
        examples: questions (``Dataset`` or list of dicts with ``id`` and ``context``).
        features: their evaluation windows (:func:`kdfast.qa.eval_features`), same order as the logits.
        start_logits, end_logits: ``[n_features, L]`` arrays (rows may be padded with anything:
            only context tokens are read).
        version_2_with_negative: allow "" answers (SQuAD v2).

    Returns ``(predictions, nbest, null_scores)``: ``{id: text}``, ``{id: [{"text",
    "probability", "start_logit", "end_logit", "offsets"}...]}`` best first, and
    ``{id: null_score - best_span_score}`` (v2 only; empty dict otherwise).
    """
    start_logits = np.asarray(start_logits, dtype=np.float64)
    end_logits = np.asarray(end_logits, dtype=np.float64)
    if start_logits.shape != end_logits.shape or start_logits.ndim != 2:
        raise ValueError(f"start_logits and end_logits must be [n_features, L] of one shape, got "
                         f"{start_logits.shape} and {end_logits.shape}")
    if start_logits.shape[0] != len(features):
        raise ValueError(f"{start_logits.shape[0]} rows of logits for {len(features)} features")
    ids = _column(examples, "id")
    contexts = _column(examples, "context")
    groups = windows_per_example(features, ids)
    if len(groups) != len(ids):
        unknown = [e for e in groups if e not in set(ids)][:3]
        raise ValueError(f"features refer to questions not in examples, e.g. {unknown}")
    offs = _offset_arrays(features)
    cls = np.asarray(_column(features, "cls_index"), dtype=np.int64)
    predictions, nbest_all, null_scores = collections.OrderedDict(), collections.OrderedDict(), {}
    for qid, context in zip(ids, contexts):
        cand_s, cand_e, cand_score, cand_f = [], [], [], []
        null = None
        for fi in groups[qid]:
            s_l, e_l = start_logits[fi], end_logits[fi]
            c = cls[fi]
            fnull = s_l[c] + e_l[c]
            if null is None or null[0] > fnull:
                null = (fnull, s_l[c], e_l[c])
            si, ei, sc = _window_candidates(s_l, e_l, offs[fi], n_best_size, max_answer_length)
            cand_s.append(si)
            cand_e.append(ei)
            cand_score.append(sc)
            cand_f.append(np.full(len(si), fi))
        if cand_s:
            si, ei, sc, fs = (np.concatenate(x) for x in (cand_s, cand_e, cand_score, cand_f))
        else:
            si = ei = fs = np.zeros(0, dtype=np.int64)
            sc = np.zeros(0)
        entries = []
        for k in np.argsort(-sc, kind="stable")[:n_best_size]:
            f, a, b = fs[k], si[k], ei[k]
            o0, o1 = int(offs[f, a, 0]), int(offs[f, b, 1])
            entries.append({"offsets": (o0, o1), "score": float(sc[k]), "start_logit": float(start_logits[f, a]),
                            "end_logit": float(end_logits[f, b]), "text": context[o0:o1]})
        if version_2_with_negative and null is not None:
            null_entry = {"offsets": (0, 0), "score": float(null[0]), "start_logit": float(null[1]),
                          "end_logit": float(null[2]), "text": ""}
            # The null answer joins the ranking (utils_qa.py) and is kept even when it ranks last.
            merged = sorted(entries + [null_entry], key=lambda x: x["score"], reverse=True)[:n_best_size]
            if not any(e["offsets"] == (0, 0) for e in merged):
                merged.append(null_entry)
            entries = merged
        if not entries or (len(entries) == 1 and entries[0]["text"] == ""):
            entries.insert(0, {"offsets": (0, 0), "score": 0.0, "start_logit": 0.0, "end_logit": 0.0,
                               "text": "empty"})
        scores = np.array([e.pop("score") for e in entries])
        probs = np.exp(scores - scores.max())
        probs /= probs.sum()
        for e, p in zip(entries, probs):
            e["probability"] = float(p)
        if not version_2_with_negative:
            predictions[qid] = entries[0]["text"]
        else:
            best = next((e for e in entries if e["text"] != ""), entries[0])
            diff = float(null[0] - best["start_logit"] - best["end_logit"])
            null_scores[qid] = diff
            predictions[qid] = "" if diff > null_score_diff_threshold else best["text"]
        nbest_all[qid] = entries
    return predictions, nbest_all, null_scores


def apply_null_threshold(nbest, null_scores, threshold: float) -> dict:
    """v2 predictions for another ``null_score_diff_threshold`` without re-running the search."""
    out = {}
    for qid, entries in nbest.items():
        best = next((e["text"] for e in entries if e["text"] != ""), "")
        out[qid] = "" if null_scores[qid] > threshold else best
    return out


def write_predictions(output_dir: str, predictions: dict, nbest: dict, null_scores: dict | None = None,
                      prefix: str = "") -> dict[str, str]:
    """Write ``predictions.json``, ``nbest_predictions.json`` (and ``null_odds.json`` for v2), as run_qa.py."""
    os.makedirs(output_dir, exist_ok=True)
    pre = f"{prefix}_" if prefix else ""
    paths = {"predictions": os.path.join(output_dir, f"{pre}predictions.json"),
             "nbest": os.path.join(output_dir, f"{pre}nbest_predictions.json")}
    with open(paths["predictions"], "w", encoding="utf-8") as fh:
        json.dump(predictions, fh, indent=2, ensure_ascii=False)
    with open(paths["nbest"], "w", encoding="utf-8") as fh:
        json.dump({k: [dict(e, offsets=list(e["offsets"])) for e in v] for k, v in nbest.items()}, fh, indent=2,
                  ensure_ascii=False)
    if null_scores:
        paths["null_odds"] = os.path.join(output_dir, f"{pre}null_odds.json")
        with open(paths["null_odds"], "w", encoding="utf-8") as fh:
            json.dump(null_scores, fh, indent=2)
    return paths
