"""Active learning for extractive QA: question-level strategies, pool scoring and the loop.

    from kdfast.active import ALConfig, ActiveLearningLoop
    loop = ActiveLearningLoop(ALConfig("out/al", strategy="margin", student_layers="0,2"),
                              pool_questions, dev_questions, tokenizer, teacher_dir="teacher/")
    loop.run()                       # al_log.json, al_results.md, al_curve.png in out/al

Names are imported lazily (``import kdfast.active`` does not load transformers).
"""
from __future__ import annotations

from kdfast.lazy_exports import lazy_exports

_EXPORTS = {
    "PoolView": "strategies", "Strategy": "strategies", "register": "strategies",
    "register_strategy": "strategies", "get_strategy": "strategies", "available_strategies": "strategies",
    "k_center_greedy": "kcenter",
    "score_pool": "pool", "select_queries": "pool", "embed_questions": "pool",
    "ALConfig": "loop", "ActiveLearningLoop": "loop", "IGNORE_POSITION": "loop",
    "plot_curves": "plot", "main_plot": "plot",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
