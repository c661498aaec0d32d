"""Loss module for extractive-QA (SQuAD) distillation."""
from __future__ import annotations

from torch import nn

from kdfast.ops import _checks
from kdfast.ops.qa_kd_loss import qa_kd_loss
from kdfast.ops.renamed_arguments import renamed_keywords


class QAKDLoss(nn.Module):
    """Module form of :func:`kdfast.ops.qa_kd_loss` (start/end logits of a QA head).

        loss_fn = QAKDLoss(temperature=2.0, soft_weight=0.5, hard_weight=0.5)
        loss = loss_fn(s.start_logits, s.end_logits, t.start_logits, t.end_logits,
                       start_positions, end_positions, mask)
    """

    def __init__(self, temperature=2.0, soft_weight=0.5, hard_weight=0.5):
        super().__init__()
        _checks.positive("temperature", temperature)
        self.options = dict(temperature=temperature, soft_weight=soft_weight, hard_weight=hard_weight)

    @renamed_keywords(attention_mask="mask")
    def forward(self, student_start, student_end, teacher_start, teacher_end, start_positions=None,
                end_positions=None, mask=None):
        return qa_kd_loss(student_start, student_end, teacher_start, teacher_end, start_positions, end_positions,
                          mask, **self.options)

    def extra_repr(self):
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
