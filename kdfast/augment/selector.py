"""The reinforced selector: a small policy network that keeps or drops each candidate.

State of a candidate (:func:`candidate_state`): teacher confidence and entropy over start and
end, teacher-student KL, similarity to the target data, the strategy's parameters (its base:
1 for a source question, 0 for a target one), the source domain (one-hot) and the student's
current dev F1. Actions: keep (1) / drop (0), one
Bernoulli per candidate. Training: REINFORCE with a moving-average baseline,

    loss = -(R - b) * sum_i log pi(a_i | s_i),    b <- beta * b + (1 - beta) * R

where R is the change of the student's dev F1 after distilling on the kept candidates.
"""
from __future__ import annotations

import torch
from torch import nn


def state_dim(num_domains):
    return 11 + num_domains


def candidate_state(stats, kl, sim, strategy, domain_index, num_domains, dev_f1):
    """One state vector (list of floats) for a candidate window; ``stats`` from
    :func:`kdfast.augment.distil.span_stats` of the teacher."""
    one_hot = [0.0] * num_domains
    if 0 <= domain_index < num_domains:
        one_hot[domain_index] = 1.0
    return [stats["conf_start"], stats["conf_end"], stats["ent_start"] / 5.0, stats["ent_end"] / 5.0,
            float(torch.log1p(torch.tensor(max(kl, 0.0)))), sim, strategy.get("mask_rate", 0.0),
            strategy.get("mix_rate", 0.0), strategy.get("steps", 0) / 3.0, dev_f1 / 100.0,
            float(strategy.get("base") == "source")] + one_hot


class Policy(nn.Module):
    """MLP ``state -> keep probability`` (``hidden=0``: logistic regression)."""

    def __init__(self, dim, hidden=32):
        super().__init__()
        self.net = nn.Linear(dim, 1) if hidden == 0 else nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(),
                                                                         nn.Linear(hidden, 1))
        last = self.net if hidden == 0 else self.net[-1]
        nn.init.zeros_(last.weight)
        nn.init.constant_(last.bias, 0.5)  # start by keeping ~62%: the student sees data from episode 1

    def forward(self, states):
        return self.net(states).squeeze(-1)  # keep logits [N]

    def keep_prob(self, states):
        return torch.sigmoid(self(states))


def sample_actions(policy, states, generator):
    with torch.no_grad():
        p = policy.keep_prob(states)
    return torch.bernoulli(p, generator=generator)


def log_prob(policy, states, actions):
    """``sum_i log pi(a_i | s_i)`` for Bernoulli actions (differentiable)."""
    logits = policy(states)
    return -nn.functional.binary_cross_entropy_with_logits(logits, actions.float(), reduction="sum")


def reinforce_loss(policy, states, actions, advantage):
    """REINFORCE surrogate ``-(R - b) * sum_i log pi(a_i | s_i)``; its gradient is the policy gradient."""
    return -float(advantage) * log_prob(policy, states, actions)


class MovingBaseline:
    def __init__(self, beta=0.8, value=0.0):
        self.beta, self.value = beta, value

    def advantage_and_update(self, reward):
        adv = reward - self.value
        self.value = self.beta * self.value + (1 - self.beta) * reward
        return adv

    def state_dict(self):
        return {"beta": self.beta, "value": self.value}

    def load_state_dict(self, d):
        self.beta, self.value = d["beta"], d["value"]


class StrategyPolicy(nn.Module):
    """The optional second action: which generator strategy to sample next, a categorical
    distribution over the strategy grid (logits start at zero: uniform, as without it).
    Trained with the same advantage: ``loss = -(R - b) * sum_j log pi(strategy_j)``."""

    def __init__(self, num_strategies):
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(num_strategies))

    def probs(self):
        return torch.softmax(self.logits, -1)

    def sample(self, n, generator):
        with torch.no_grad():
            return torch.multinomial(self.probs(), n, replacement=True, generator=generator)

    def log_prob(self, indices):
        return torch.log_softmax(self.logits, -1)[torch.as_tensor(indices, dtype=torch.long)].sum()


class Critic(nn.Module):
    """The actor-critic option: ``V(mean state of the episode's candidates)`` predicts the
    episode's reward and replaces the moving average as the baseline (advantage ``R - V``);
    trained on ``(V - R)^2``. The mean state carries the student's current dev F1, so the
    critic can expect smaller gains from a better student."""

    def __init__(self, dim, hidden=32):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, 1))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, states):
        return self.net(states.mean(0)).squeeze(-1)
