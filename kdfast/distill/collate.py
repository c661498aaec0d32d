"""Batches for distillation: QA windows plus the cached teacher logits as ``[B, L]`` tensors."""
from __future__ import annotations

import torch

from kdfast.distill.teacher_cache import scatter_teacher_logits
from kdfast.qa.collate import QACollator


class DistillCollator(QACollator):
    """:class:`kdfast.qa.QACollator` that also turns cached teacher rows (``teacher_start`` /
    ``teacher_end``, CLS + context tokens) into ``teacher_start_logits`` / ``teacher_end_logits``
    ``[B, L]`` with -inf outside the span-distribution tokens."""

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        batch = super().__call__(features)
        if "teacher_start" in features[0]:
            L = batch["input_ids"].shape[1]
            shift = None
            if self.left:
                shift = [L - len(f["input_ids"]) for f in features]
            batch["teacher_start_logits"], batch["teacher_end_logits"] = scatter_teacher_logits(features, L, shift)
        return batch


def span_mask(batch: dict, L: int) -> torch.Tensor:
    """``[B, L]`` bool: the tokens the span distributions cover (CLS and the window's context).

    CLS is included in SQuAD v1 too: run_qa.py labels a window that does not contain the
    answer with the CLS index, so the model must be able to put mass there.
    """
    pos = torch.arange(L, device=batch["input_ids"].device)[None, :]
    m = (pos >= batch["context_start"][:, None]) & (pos <= batch["context_end"][:, None])
    m |= pos == batch["cls_index"][:, None]
    if "attention_mask" in batch:
        m &= batch["attention_mask"].bool()
    return m
