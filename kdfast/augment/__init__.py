"""Learning to augment for data-scarce QA distillation (Feng et al., AAAI 2021).

A cross-domain generator (retrieve source passages, corrupt and reconstruct the target
passage with source spans and a masked LM, answer span kept), a reinforced selector
(REINFORCE over keep/drop, reward = change of the student's held-out dev F1), and the
hand-designed baselines in the same loop.

    from kdfast.augment import AugmentConfig, AugmentLoop
"""
from __future__ import annotations

from kdfast.lazy_exports import lazy_exports

_EXPORTS = {
    "AugmentConfig": "loop", "AugmentLoop": "loop", "METHODS": "loop", "finetune_teacher": "loop",
    "Strategy": "generator", "manipulate": "generator", "strategy_grid": "generator", "embed": "generator",
    "retrieve": "generator", "Policy": "selector", "reinforce_loss": "selector", "MovingBaseline": "selector",
    "synthetic_domains": "data", "split_target": "data", "tinybert_replace": "baselines",
    "mix_windows": "baselines",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
