"""Active learning for extractive QA: question-level strategies, pool scoring and the loop.

    from kdfast.active import ALConfig, ActiveLearningLoop
    loop = ActiveLearningLoop(ALConfig("out/al", strategy="margin", student_layers="0,2"),
                              pool_questions, dev_questions, tokenizer, teacher_dir="teacher/")
    loop.run()                       # al_log.json, al_results.md, al_curve.png in out/al

Names are imported lazily (``import kdfast.active`` does not load transformers).
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "PoolView": "strategies", "Strategy": "strategies", "register": "strategies",
    "register_strategy": "strategies", "get_strategy": "strategies", "available_strategies": "strategies",
    "k_center_greedy": "kcenter",
    "score_pool": "pool", "select_queries": "pool", "embed_questions": "pool",
    "ALConfig": "loop", "ActiveLearningLoop": "loop", "IGNORE_POSITION": "loop",
    "plot_curves": "plot", "main_plot": "plot",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'kdfast.active' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"kdfast.active.{mod}"), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
