"""Extractive QA data: SQuAD loading, HF run_qa.py-exact windows and post-processing,
the official SQuAD metrics, and the built-in offline data (generator, tokenizer, configs).

    from kdfast import qa
    dev = qa.load_squad("dev-v1.1.json")
    feats = qa.eval_features(dev, tokenizer)              # windows, keyed by example_id
    result = qa.evaluate_qa(model, tokenizer, dev)        # metrics, predictions, n-best

This package knows nothing of distillation (DESIGN.md: the bottom of the
pipelines layer). Names are imported lazily: ``import kdfast.qa`` stays cheap.
"""
from __future__ import annotations

from kdfast.lazy_exports import lazy_exports

_EXPORTS = {
    "load_squad": "load", "SquadFormatError": "load", "write_squad_json": "load", "write_jsonl": "load",
    "count_questions": "load",
    "prepare_train_features": "features", "prepare_eval_features": "features", "train_features": "features",
    "eval_features": "features", "windows_per_example": "features", "check_tokenizer": "features",
    "QACollator": "collate",
    "postprocess_predictions": "postprocess", "apply_null_threshold": "postprocess",
    "write_predictions": "postprocess",
    "normalize_answer": "metrics", "exact_match": "metrics", "f1": "metrics", "squad_v1_metrics": "metrics",
    "squad_v2_metrics": "metrics", "per_question_scores": "metrics", "find_best_threshold": "metrics",
    "evaluate_qa": "evaluate", "predict_logits": "evaluate", "QAResult": "evaluate",
    "generate_squad": "synthetic", "write_generated": "synthetic", "DOMAINS": "synthetic",
    "train_wordpiece_tokenizer": "tokenizer", "builtin_tokenizer": "tokenizer",
    "teacher_config": "configs", "student_config": "configs",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
