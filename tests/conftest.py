"""Test tiers (DESIGN.md): reference+CPU always; Triton under the interpreter;
CUDA when a GPU is present; nvcc compile-check when nvcc exists; slow e2e.

Each skipped tier prints its reason in the summary. Nothing here touches a GPU
at collection time: a CPU build of torch cannot have one, and on CUDA builds
the check runs only when a cuda-marked test is about to execute.
"""
import os
import shutil

import pytest
import torch

# Triton kernels run on CPU tensors only in interpreter mode; it must be set
# before triton is imported. Only on CPU builds of torch (a GPU runs them natively).
if torch.version.cuda is None and "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "1"

import kdfast  # noqa: E402,F401  (imported first: builds / loads the extension once)
from kdfast import _ext, backends  # noqa: E402

_tiers = {}
_counts = {}  # tier -> [ran, skipped]
TIERS = ("cpu", "triton", "cuda", "nvcc", "slow")


def _cuda_reason():
    if torch.version.cuda is None:
        return "torch is a CPU build (no CUDA)"
    if not torch.cuda.is_available():
        return "no CUDA GPU visible"
    if not _ext.build_info().get("with_cuda"):
        return "kdfast._C built without CUDA sources"
    return None


def tier_reason(tier):
    """None if the tier can run here, else why not (cached)."""
    if tier not in _tiers:
        if tier == "triton":
            # This tier runs Triton kernels on CPU tensors under the interpreter; on a GPU
            # machine the same kernels run compiled in the cuda tier (tests/kernels/*gpu*, *cuda*).
            r = backends.triton_available()
            if r is None and not backends.triton_interpret():
                r = "TRITON_INTERPRET is not 1 (this tier runs Triton on CPU tensors in the interpreter)"
        elif tier == "cuda":
            r = _cuda_reason()
        elif tier == "nvcc":
            r = None if shutil.which("nvcc") else "nvcc not found on PATH"
        elif tier == "slow":
            r = None if os.environ.get("KDFAST_SKIP_SLOW", "0") != "1" else "KDFAST_SKIP_SLOW=1"
        elif tier == "cpu":
            r = None if _ext.extension() is not None else f"kdfast._C unavailable: {_ext.extension_error()}"
        else:
            r = None
        _tiers[tier] = r
    return _tiers[tier]


def pytest_configure(config):
    for m in ("cpu: needs the compiled CPU kernels",):
        config.addinivalue_line("markers", m)


def pytest_runtest_setup(item):
    for tier in TIERS:
        if item.get_closest_marker(tier):
            r = tier_reason(tier)
            _counts.setdefault(tier, [0, 0])[r is not None] += 1
            if r is not None:
                pytest.skip(f"{tier} tier skipped: {r}")


def pytest_terminal_summary(terminalreporter):
    tr = terminalreporter
    tr.section("kdfast test tiers")
    tr.write_line("reference: always runs")
    for tier in TIERS:
        r = tier_reason(tier)
        ran, skipped = _counts.get(tier, [0, 0])
        if r is None:
            tr.write_line(f"{tier}: ran {ran} tests")
        else:
            tr.write_line(f"{tier}: SKIPPED {skipped} tests ({r})")
    if _ext.extension() is not None:
        from kdfast import cpu_isa
        tr.write_line(f"cpu ISA paths tested: {', '.join(cpu_isa.available_isas())}")
