"""The policy gradient matches a hand-computed case; the moving baseline."""
import math

import torch

from kdfast.augment.selector import (Critic, MovingBaseline, Policy, StrategyPolicy, candidate_state, reinforce_loss,
                                     state_dim)


def test_policy_gradient_hand_computed():
    pol = Policy(2, hidden=0)
    with torch.no_grad():
        pol.net.weight.copy_(torch.tensor([[0.5, -1.0]]))
        pol.net.bias.fill_(0.25)
    x = torch.tensor([[1.0, 2.0], [-1.0, 0.5], [0.0, 0.0]], dtype=torch.float32)
    a = torch.tensor([1.0, 0.0, 1.0])
    adv = 0.7
    loss = reinforce_loss(pol, x, a, adv)
    loss.backward()
    # By hand: p_i = sigmoid(w.x_i + b); d log pi(a_i)/d(w, b) = (a_i - p_i) * (x_i, 1);
    # d loss = -adv * sum_i (a_i - p_i) * (x_i, 1).
    z = [0.5 * 1 - 1.0 * 2 + 0.25, 0.5 * -1 - 1.0 * 0.5 + 0.25, 0.25]
    p = [1 / (1 + math.exp(-v)) for v in z]
    gw = [-adv * sum((a[i].item() - p[i]) * x[i, k].item() for i in range(3)) for k in range(2)]
    gb = -adv * sum(a[i].item() - p[i] for i in range(3))
    assert torch.allclose(pol.net.weight.grad, torch.tensor([gw]), atol=1e-6)
    assert abs(pol.net.bias.grad.item() - gb) < 1e-6
    logp = sum(math.log(p[i] if a[i] else 1 - p[i]) for i in range(3))
    assert abs(loss.item() - (-adv * logp)) < 1e-5


def test_mlp_policy_gradient_is_autograd_of_log_prob():
    torch.manual_seed(0)
    pol = Policy(5, hidden=8)
    torch.nn.init.normal_(pol.net[-1].weight)
    x = torch.randn(6, 5)
    a = torch.tensor([1.0, 0, 0, 1, 1, 0])
    reinforce_loss(pol, x, a, -2.0).backward()
    g = [p.grad.clone() for p in pol.parameters()]
    pol.zero_grad()
    p = pol.keep_prob(x)
    (2.0 * (a * p.log() + (1 - a) * (1 - p).log()).sum()).backward()
    for u, v in zip(g, pol.parameters()):
        assert torch.allclose(u, v.grad, atol=1e-5)


def test_moving_baseline():
    b = MovingBaseline(beta=0.5)
    assert b.advantage_and_update(2.0) == 2.0 and b.value == 1.0
    assert b.advantage_and_update(0.0) == -1.0 and b.value == 0.5


def test_state_layout():
    s = candidate_state({"conf_start": 0.9, "conf_end": 0.8, "ent_start": 1.0, "ent_end": 2.0}, 0.5, 0.3,
                        {"mask_rate": 0.3, "mix_rate": 0.5, "steps": 2}, 1, 2, 40.0)
    assert len(s) == state_dim(2) and s[-2:] == [0.0, 1.0] and s[9] == 0.4 and s[10] == 0.0
    s = candidate_state({"conf_start": 0.9, "conf_end": 0.8, "ent_start": 1.0, "ent_end": 2.0}, 0.5, 0.3,
                        {"mask_rate": 0.3, "mix_rate": 0.5, "steps": 2, "base": "source"}, 0, 2, 40.0)
    assert s[10] == 1.0 and s[-2:] == [1.0, 0.0]


def test_strategy_policy_gradient_hand_computed():
    """loss = -A * sum_j log softmax(z)[s_j]; by hand d loss / d z_k = -A * (count_k - n * p_k)."""
    pol = StrategyPolicy(3)
    with torch.no_grad():
        pol.logits.copy_(torch.tensor([0.2, -0.4, 1.0]))
    idx, adv = [0, 0, 2, 1, 0], 1.5
    loss = -adv * pol.log_prob(idx)
    loss.backward()
    e = [math.exp(v) for v in (0.2, -0.4, 1.0)]
    p = [v / sum(e) for v in e]
    counts = [3, 1, 1]
    want = [-adv * (counts[k] - len(idx) * p[k]) for k in range(3)]
    assert torch.allclose(pol.logits.grad, torch.tensor(want), atol=1e-6)
    assert abs(loss.item() - (-adv * sum(math.log(p[i]) for i in idx))) < 1e-5
    # Zero logits: uniform; a seeded generator gives the same draws.
    u = StrategyPolicy(4)
    assert torch.allclose(u.probs(), torch.full((4,), 0.25))
    draws = [u.sample(50, torch.Generator().manual_seed(3)).tolist() for _ in range(2)]
    assert draws[0] == draws[1] and set(draws[0]) == {0, 1, 2, 3}


def test_critic_starts_at_zero_and_learns_the_reward():
    torch.manual_seed(0)
    critic = Critic(5, hidden=8)
    states = torch.randn(7, 5)
    assert critic(states).item() == 0.0  # zero last layer: the first advantage is the reward itself
    opt = torch.optim.Adam(critic.parameters(), lr=0.05)
    errs = []
    for _ in range(100):
        v = critic(states)
        errs.append(abs(v.item() - 3.0))
        opt.zero_grad()
        ((v - 3.0) ** 2).backward()
        opt.step()
    assert errs[-1] < 0.1 * errs[0]
