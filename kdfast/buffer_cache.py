"""The CPU buffer cache of the compiled kernels.

A fresh CPU tensor the size of a logits matrix (477 MiB at N=4096,
V=30522 fp32) costs tens of milliseconds of first-touch page faults every
time it is allocated: glibc maps and unmaps blocks that large on every
allocation. The CPU kd_loss kernels therefore take their gradient from a
one-block cache: when the gradient tensor dies (after the optimizer step),
its memory stays mapped and the next step's gradient of a similar size
reuses it, like PyTorch's CUDA caching allocator. Only blocks of 16 MiB and
more are cached, one at a time.

    kdfast.buffer_cache.bytes_held()     # what the cache holds now
    kdfast.buffer_cache.clear()          # give it back to the OS
    with kdfast.buffer_cache.disabled(): ...
    KDFAST_CPU_BUFFER_CACHE=0            # never cache (environment, read at start)
"""
from __future__ import annotations

import contextlib

import torch

from kdfast import _ext


def _ops():
    if _ext.extension() is None:
        return None
    return torch.ops.kdfast_C


def clear() -> None:
    """Free the cached block, if any."""
    ops = _ops()
    if ops is not None:
        ops.cpu_buffer_cache_clear()


def bytes_held() -> int:
    """Bytes the cache holds now (0 without the extension)."""
    ops = _ops()
    return 0 if ops is None else int(ops.cpu_buffer_cache_bytes())


def set_enabled(on: bool) -> bool:
    """Turn the cache on or off (off also frees it); returns the previous setting."""
    ops = _ops()
    return False if ops is None else bool(ops.cpu_buffer_cache_enable(bool(on)))


@contextlib.contextmanager
def disabled():
    """Run the block without the cache (and with nothing cached), then restore the setting."""
    prev = set_enabled(False)
    try:
        yield
    finally:
        set_enabled(prev)
