"""Loss module for distillation on LM-head outputs without materialised logits."""
from __future__ import annotations

from torch import nn

from kdfast.ops import _checks
from kdfast.ops.fused_linear_kd_loss import fused_linear_kd_loss
from kdfast.ops.kd_loss import DIVERGENCES, REDUCTIONS
from kdfast.ops.renamed_arguments import renamed_keywords


class FusedLinearKDLoss(nn.Module):
    """Module form of :func:`kdfast.ops.fused_linear_kd_loss`; holds the loss options.

        loss_fn = FusedLinearKDLoss(temperature=2.0, hard_weight=0.5, soft_weight=0.5)
        loss = loss_fn(student_out.hidden_states[-1], student.lm_head.weight,
                       teacher_out.hidden_states[-1], teacher.lm_head.weight, labels)
    """

    def __init__(self, temperature=1.0, divergence="kl", beta=0.5, soft_weight=1.0, hard_weight=0.0,
                 ignore_index=-100, reduction="batchmean", scale_by_t2=True, chunk_size=None):
        super().__init__()
        _checks.positive("temperature", temperature)
        _checks.choice("divergence", divergence, DIVERGENCES)
        _checks.choice("reduction", reduction, REDUCTIONS)
        _checks.in_unit("beta", beta)
        self.options = dict(temperature=temperature, divergence=divergence, beta=beta, soft_weight=soft_weight,
                            hard_weight=hard_weight, ignore_index=ignore_index, reduction=reduction,
                            scale_by_t2=scale_by_t2, chunk_size=chunk_size)

    @renamed_keywords(student_lm_head_weight="student_weight")
    def forward(self, student_hidden, student_weight, teacher_hidden, teacher_weight, labels=None, *,
                student_bias=None, teacher_bias=None):
        return fused_linear_kd_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, labels,
                                    student_bias=student_bias, teacher_bias=teacher_bias, **self.options)

    def extra_repr(self):
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
