"""QA distillation: ``DistillationTrainer`` (a ``transformers.Trainer``), the teacher cache,
student initialisation, the compression recipe and model save/load.

    from kdfast.distill import DistillationTrainer, DistillConfig, TeacherCache, run_recipe

Names are imported lazily (transformers is only loaded when one is used).
"""
from __future__ import annotations

from kdfast.lazy_exports import lazy_exports

_EXPORTS = {
    "DistillationTrainer": "trainer", "DistillConfig": "trainer", "parse_layer_losses": "trainer",
    "TeacherCache": "teacher_cache", "DistillCollator": "collate", "span_mask": "collate",
    "parse_student_layers": "student", "student_from_teacher": "student", "student_from_config": "student",
    "check_compatible": "student",
    "TrainOptions": "stage", "train_stage": "stage",
    "RecipeConfig": "recipe", "run_recipe": "recipe", "measure_row": "recipe",
    "load_qa_model": "models", "load_tokenizer": "models", "save_ternary": "models", "model_kind": "models",
    "count_parameters": "models", "weights_size": "models", "inference_ready": "models", "unpad_if_supported": "models",
    "cpu_speed": "measure",
    "IGNORE_POSITION": "unlabeled", "unlabeled_windows": "unlabeled", "with_unlabeled": "unlabeled",
    "without_labels": "unlabeled",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
