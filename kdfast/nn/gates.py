"""L0 pruning gates (hard-concrete, Louizos et al. 2018) and a Lagrangian sparsity controller.

    gate = HardConcreteGate(12)           # one gate per attention head
    z = gate()                            # training: stochastic [12] in [0, 1]; eval: deterministic
    l0 = gate.expected_l0()               # expected number of open gates (differentiable)

    ctl = SparsityController(target=0.6, warmup_steps=1000)
    loss = task_loss + ctl.penalty(expected_sparsity, step)   # one optimizer: lambdas ascend

Hard concrete: with u ~ U(0, 1), s = sigmoid((log u - log(1 - u) + log_alpha) / beta),
z = clamp(s * (zeta - gamma) + gamma, 0, 1), beta = 2/3, (gamma, zeta) = (-0.1, 1.1).
P(z != 0) = sigmoid(log_alpha - beta * log(-gamma / zeta)). The deterministic
(inference) gate is clamp(sigmoid(log_alpha) * (zeta - gamma) + gamma, 0, 1),
exactly 0 for strongly closed gates, so pruned units are well defined.
"""
from __future__ import annotations

import math

import torch
from torch import nn


class HardConcreteGate(nn.Module):
    """``n`` hard-concrete gates with learnable ``log_alpha`` ``[n]``.

    Args:
        n: number of gates.
        init_keep: initial probability-like value of the gates: log_alpha is
            initialised to ``logit(init_keep)`` plus N(0, 0.01) noise (CoFi / Louizos style).
        temperature: beta (2/3).
        limits: stretch interval (gamma, zeta), (-0.1, 1.1).

    ``forward()`` returns ``[n]`` float32: a sample in training mode, the
    deterministic gate in eval mode.
    """

    def __init__(self, n: int, *, init_keep: float = 0.9, temperature: float = 2.0 / 3.0,
                 limits: tuple[float, float] = (-0.1, 1.1)):
        super().__init__()
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        if not 0.0 < init_keep < 1.0:
            raise ValueError(f"init_keep must be in (0, 1), got {init_keep!r}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        gamma, zeta = limits
        if not (gamma < 0.0 and zeta > 1.0):
            raise ValueError(f"limits must be (gamma < 0, zeta > 1), got {limits!r}")
        self.n, self.temperature, self.gamma, self.zeta = n, float(temperature), float(gamma), float(zeta)
        init = math.log(init_keep) - math.log1p(-init_keep)
        self.log_alpha = nn.Parameter(torch.full((n,), init) + 0.01 * torch.randn(n))

    def extra_repr(self):
        return f"n={self.n}, temperature={self.temperature:.3g}, limits=({self.gamma}, {self.zeta})"

    def sample(self) -> torch.Tensor:
        """Stochastic gate values ``[n]`` in [0, 1] (reparameterised: gradients reach log_alpha)."""
        eps = 1e-6
        u = torch.rand_like(self.log_alpha).clamp(eps, 1 - eps)
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + self.log_alpha) / self.temperature)
        return (s * (self.zeta - self.gamma) + self.gamma).clamp(0.0, 1.0)

    def deterministic(self) -> torch.Tensor:
        """Inference gates ``[n]``: clamp(sigmoid(log_alpha) * (zeta - gamma) + gamma, 0, 1)."""
        return (torch.sigmoid(self.log_alpha) * (self.zeta - self.gamma) + self.gamma).clamp(0.0, 1.0)

    def prob_nonzero(self) -> torch.Tensor:
        """P(z_i != 0) ``[n]`` (differentiable)."""
        return torch.sigmoid(self.log_alpha - self.temperature * math.log(-self.gamma / self.zeta))

    def expected_l0(self) -> torch.Tensor:
        """Expected number of non-zero gates (scalar, differentiable)."""
        return self.prob_nonzero().sum()

    def hard_mask(self, keep: int | None = None) -> torch.Tensor:
        """Binary keep mask ``[n]`` bool: deterministic gate > 0, or the ``keep`` largest log_alpha."""
        if keep is None:
            return self.deterministic() > 0
        if not 0 <= keep <= self.n:
            raise ValueError(f"keep must be in [0, {self.n}], got {keep}")
        mask = torch.zeros(self.n, dtype=torch.bool, device=self.log_alpha.device)
        mask[torch.topk(self.log_alpha, keep).indices] = True
        return mask

    def forward(self) -> torch.Tensor:
        return self.sample() if self.training else self.deterministic()


def _flip_grad(g):
    return -g


class SparsityController(nn.Module):
    """Lagrangian sparsity control (Wang et al. 2020, CoFi).

    ``penalty(s, step) = lambda_1 * (s - t) + lambda_2 * (s - t)^2`` where
    ``s`` is the expected sparsity (differentiable, from the gates) and
    ``t = target * min(1, step / warmup_steps)``. ``lambda_1``, ``lambda_2``
    are parameters whose gradient is negated, so one optimizer minimising
    the total loss does gradient *ascent* on them: the penalty pushes ``s``
    to ``t`` from either side. Give them their own param group (no weight
    decay, learning rate similar to the gates').
    """

    def __init__(self, target: float, *, warmup_steps: int = 0):
        super().__init__()
        if not 0.0 <= target < 1.0:
            raise ValueError(f"target must be in [0, 1), got {target!r}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps!r}")
        self.target = float(target)
        self.warmup_steps = int(warmup_steps)
        self.lambda_1 = nn.Parameter(torch.zeros(()))
        self.lambda_2 = nn.Parameter(torch.zeros(()))
        self.lambda_1.register_hook(_flip_grad)
        self.lambda_2.register_hook(_flip_grad)

    def target_at(self, step: int) -> float:
        if self.warmup_steps == 0:
            return self.target
        return self.target * min(1.0, step / self.warmup_steps)

    def penalty(self, expected_sparsity: torch.Tensor, step: int) -> torch.Tensor:
        d = expected_sparsity - self.target_at(step)
        return self.lambda_1 * d + self.lambda_2 * d * d
