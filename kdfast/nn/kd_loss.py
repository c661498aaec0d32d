"""Loss modules for logit distillation."""
from __future__ import annotations

from torch import nn

from kdfast.ops import _checks
from kdfast.ops.kd_loss import DIVERGENCES, REDUCTIONS, kd_loss


class KDLoss(nn.Module):
    """Module form of :func:`kdfast.ops.kd_loss`.

    Drop-in for ``T * T * nn.KLDivLoss(reduction="batchmean")(log_softmax(s / T), softmax(t / T))``::

        loss_fn = KDLoss(temperature=2.0, hard_weight=0.5, soft_weight=0.5)
        loss = loss_fn(student_logits, teacher_logits, labels)
    """

    def __init__(self, temperature=1.0, divergence="kl", beta=0.5, soft_weight=1.0, hard_weight=0.0,
                 ignore_index=-100, reduction="batchmean", scale_by_t2=True):
        super().__init__()
        self.options = dict(temperature=temperature, divergence=divergence, beta=beta, soft_weight=soft_weight,
                            hard_weight=hard_weight, ignore_index=ignore_index, reduction=reduction,
                            scale_by_t2=scale_by_t2)
        # Validate once, at construction, with the same messages as the op.
        _checks.positive("temperature", temperature)
        _checks.choice("divergence", divergence, DIVERGENCES)
        _checks.choice("reduction", reduction, REDUCTIONS)
        _checks.in_unit("beta", beta)

    def forward(self, student_logits, teacher_logits, labels=None):
        return kd_loss(student_logits, teacher_logits, labels, **self.options)

    def extra_repr(self):
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
