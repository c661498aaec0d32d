"""Control of the CPU instruction-set path used by compiled kernels.

The extension compiles every hot loop for several ISAs (scalar baseline,
AVX2, AVX-512, AVX-512 VNNI) and picks the best one the CPU supports at run
time. ``KDFAST_CPU_ISA=avx2`` (or ``use_cpu_isa("avx2")``) caps that choice, so
an AVX-512 machine can run and test the code an AVX2-only machine would.
"""
from __future__ import annotations

import contextlib

from kdfast import _ext

ISAS = ("scalar", "avx2", "avx512", "avx512_vnni")


def _c():
    c = _ext.extension()
    if c is None:
        raise RuntimeError(f"kdfast: compiled extension unavailable: {_ext.extension_error()}")
    return c


def hardware_isa() -> str:
    """Best path this CPU supports."""
    return _c().hardware_isa()


def current_isa() -> str:
    """Path the kernels use now (hardware, capped)."""
    return _c().cpu_isa()


def available_isas() -> list[str]:
    """Paths that can run on this CPU (each can be forced with use_cpu_isa)."""
    hw = ISAS.index(hardware_isa())
    return [i for i in ISAS[: hw + 1] if i in _c().build_info()["cpu_isa_paths"]]


@contextlib.contextmanager
def use_cpu_isa(name: str):
    """Cap the CPU path to ``name`` inside the block (``name`` must be supported here)."""
    if name not in ISAS:
        raise ValueError(f"use_cpu_isa: unknown ISA {name!r}; expected one of {ISAS}")
    if name not in available_isas():
        raise ValueError(f"use_cpu_isa: {name!r} cannot run on this CPU (available: {available_isas()})")
    c = _c()
    prev = c.max_isa()
    c.set_max_isa(name)
    try:
        yield
    finally:
        c.set_max_isa(prev)
