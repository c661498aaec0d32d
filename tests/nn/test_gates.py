"""HardConcreteGate math and the Lagrangian sparsity controller."""
import math

import pytest
import torch

from kdfast.nn import HardConcreteGate, SparsityController


def test_samples_in_unit_interval_with_exact_zeros_and_ones():
    torch.manual_seed(0)
    g = HardConcreteGate(2000, init_keep=0.5)
    z = g.train()()
    assert z.shape == (2000,) and z.min() >= 0 and z.max() <= 1
    assert (z == 0).any() and (z == 1).any()  # the stretch makes exact 0/1 reachable


def test_prob_nonzero_matches_sampling_frequency():
    torch.manual_seed(1)
    g = HardConcreteGate(5)
    with torch.no_grad():
        g.log_alpha.copy_(torch.tensor([-3.0, -1.0, 0.0, 1.0, 3.0]))
        freq = torch.stack([g.sample() > 0 for _ in range(20000)]).float().mean(0)
    # closed form: sigmoid(log_alpha - beta * log(-gamma / zeta))
    want = torch.sigmoid(g.log_alpha - (2 / 3) * math.log(0.1 / 1.1))
    torch.testing.assert_close(g.prob_nonzero(), want)
    torch.testing.assert_close(freq, want.detach(), atol=0.015, rtol=0)
    torch.testing.assert_close(g.expected_l0(), want.sum())


def test_deterministic_gate_and_hard_mask():
    g = HardConcreteGate(4).eval()
    with torch.no_grad():
        g.log_alpha.copy_(torch.tensor([-10.0, -3.0, 0.0, 10.0]))
    z = g()
    want = (torch.sigmoid(g.log_alpha) * 1.2 - 0.1).clamp(0, 1)
    torch.testing.assert_close(z, want)
    assert z[0] == 0 and z[3] == 1 and 0 < z[2] < 1
    assert torch.equal(g(), z)  # eval is deterministic
    assert g.hard_mask().tolist() == [False, False, True, True]
    assert g.hard_mask(keep=1).tolist() == [False, False, False, True]


def test_gradients_reach_log_alpha():
    g = HardConcreteGate(8, init_keep=0.5)
    (g.train()() * torch.arange(8.0)).sum().backward()
    assert g.log_alpha.grad is not None
    g.log_alpha.grad = None
    g.expected_l0().backward()
    assert (g.log_alpha.grad > 0).all()


@pytest.mark.parametrize("kw, err", [(dict(n=0), "n must"), (dict(n=3, init_keep=1.0), "init_keep"),
                                     (dict(n=3, limits=(0.0, 1.1)), "limits"),
                                     (dict(n=3, temperature=0), "temperature")])
def test_gate_bad_args(kw, err):
    with pytest.raises(ValueError, match=err):
        HardConcreteGate(**kw)


def test_controller_warmup_schedule_and_ascent():
    c = SparsityController(0.6, warmup_steps=100)
    assert c.target_at(0) == 0 and c.target_at(50) == pytest.approx(0.3) and c.target_at(1000) == 0.6
    s = torch.tensor(0.2, requires_grad=True)
    c.penalty(s, 1000).backward()
    # d penalty / d lambda_1 = s - t = -0.4; the gradient is flipped, so lambda_1 grows in the minimising direction
    assert c.lambda_1.grad.item() == pytest.approx(0.4)
    with pytest.raises(ValueError, match="target"):
        SparsityController(1.0)


def test_controller_reaches_target_on_toy_problem():
    torch.manual_seed(0)
    g = HardConcreteGate(200)
    c = SparsityController(0.6, warmup_steps=150)
    opt = torch.optim.Adam([{"params": g.parameters(), "lr": 0.05}, {"params": c.parameters(), "lr": 0.05}])
    importance = torch.linspace(0.1, 1.0, 200)
    for step in range(600):
        task = -(importance * g.train()()).sum() / 200  # the task wants every gate open
        s = 1 - g.expected_l0() / 200
        loss = task + c.penalty(s, step)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert abs(s.item() - 0.6) < 0.03
    pruned = ~g.eval().hard_mask()
    assert abs(pruned.float().mean().item() - 0.6) < 0.05
    # the least important units are the ones pruned
    assert importance[pruned].mean() < importance[~pruned].mean()
