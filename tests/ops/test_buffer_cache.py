"""The one-block CPU buffer cache behind the kd_loss gradient (kdfast.buffer_cache)."""
import os
import subprocess
import sys

import pytest
import torch

import kdfast
from kdfast import buffer_cache
from kdfast.ops import kd_loss

pytestmark = pytest.mark.cpu

BIG_V = 4096  # rows of 16 KiB: 1100 rows = 17.2 MiB, over the 16 MiB floor


def _grad(n, v=BIG_V, seed=0, dtype=torch.float32, **opts):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(n, v, generator=g) * 5).to(dtype).requires_grad_()
    t = torch.randn(n, v, generator=g) * 5
    with kdfast.use_backend("cpu"):
        kd_loss(s, t, temperature=2.0, **opts).backward()
    return s, t, s.grad


def _expected(s, t, **opts):
    x = s.detach().double().requires_grad_()
    kdfast.ops.kd_loss_reference(x, t.double(), temperature=2.0, **opts).backward()
    return x.grad


def _close(g, want):
    """float32 kernel gradient vs float64: relative error 1e-4, absolute 1e-6 of the largest entry."""
    return torch.allclose(g.double(), want, rtol=1e-4, atol=1e-6 * want.abs().max().item())


def test_reused_block_gives_correct_gradients():
    buffer_cache.clear()
    s1, t1, g1 = _grad(1100, seed=1)
    ptr = g1.data_ptr()
    assert _close(g1, _expected(s1, t1))
    del g1, s1  # the gradient dies: its block goes to the cache
    assert buffer_cache.bytes_held() >= 1100 * BIG_V * 4
    s2, t2, g2 = _grad(1050, seed=2, reduction="sum")  # a little smaller: same block, stale data overwritten
    assert g2.data_ptr() == ptr
    assert buffer_cache.bytes_held() == 0
    assert _close(g2, _expected(s2, t2, reduction="sum"))


def test_small_and_mismatched_sizes_are_not_served_from_the_cache():
    buffer_cache.clear()
    _, _, g = _grad(2200, seed=3)
    del g
    held = buffer_cache.bytes_held()
    assert held >= 2200 * BIG_V * 4
    _, _, small = _grad(8, seed=4)  # under 16 MiB: plain allocation, cache untouched
    assert buffer_cache.bytes_held() == held
    s, t, g = _grad(1050, seed=5)  # under half the cached block: a new block
    assert buffer_cache.bytes_held() == 0
    assert _close(g, _expected(s, t))


def test_clear_and_disable():
    _, _, g = _grad(1100, seed=6)
    del g
    assert buffer_cache.bytes_held() > 0
    buffer_cache.clear()
    assert buffer_cache.bytes_held() == 0
    with buffer_cache.disabled():
        _, _, g = _grad(1100, seed=7)
        del g
        assert buffer_cache.bytes_held() == 0
    _, _, g = _grad(1100, seed=8)
    del g
    assert buffer_cache.bytes_held() > 0
    buffer_cache.clear()


def test_environment_switch_turns_it_off():
    code = ("import torch, kdfast; from kdfast.ops import kd_loss\n"
            "s = torch.randn(1100, 4096, requires_grad=True); t = torch.randn(1100, 4096)\n"
            "kd_loss(s, t).backward(); del s\n"
            "print(kdfast.buffer_cache.bytes_held())")
    env = dict(os.environ, KDFAST_CPU_BUFFER_CACHE="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "0"


def test_gradient_accumulation_into_a_cached_gradient():
    buffer_cache.clear()
    s, t, g = _grad(1100, seed=9)
    first = g.clone()
    with kdfast.use_backend("cpu"):
        kd_loss(s, t, temperature=2.0).backward()  # accumulates into s.grad (a cached-block tensor)
    assert torch.allclose(s.grad, 2 * first, rtol=1e-6, atol=1e-12)
