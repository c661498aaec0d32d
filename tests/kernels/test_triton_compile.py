"""Every @triton.jit kernel of kdfast/kernels/triton compiled for real GPUs, without a GPU.

The interpreter (TRITON_INTERPRET=1, what the other Triton tests run) does not check what
a real compile checks: globals captured in kernels, type rules (e.g. consistent return
types), tl.dot shape/dtype constraints, layouts, shared memory. Here each case in
tests/kernels/triton_compile_cases.py calls a launcher on meta tensors of realistic size,
records the launches (arguments, constexprs, num_warps exactly as the launcher passes
them) and compiles them through Triton's own toolchain down to a cubin for sm_90 (H100 /
H200; the kd_loss and ternary GEMM kernels for sm_80 as well). Each launch must compile
and fit the per-block shared memory of its target.

All cases compile in one subprocess (the test session runs with TRITON_INTERPRET=1, under
which @triton.jit functions cannot be compiled), with a fresh Triton cache so every run
compiles for real. Skipped, with the reason, only when Triton has no NVIDIA backend.
"""
import json
import os
import subprocess
import sys

import pytest

from tests.kernels.triton_compile_cases import CASES, GRID_LIMIT, MODULES, SHARED_LIMIT

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _nvidia_backend_missing():
    try:
        import triton.backends.nvidia.compiler  # noqa: F401
    except ImportError as e:
        return f"triton has no NVIDIA backend: {e}"
    return None


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    reason = _nvidia_backend_missing()
    if reason:
        pytest.skip(reason)
    tmp = tmp_path_factory.mktemp("triton_compile")
    out = tmp / "results.json"
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp / "cache"),
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-m", "tests.kernels.triton_compile_cases", str(out)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and out.exists(), f"compile worker failed:\n{r.stdout[-4000:]}\n{r.stderr[-8000:]}"
    print("\n" + r.stdout)  # per launch: shared memory, warps, registers, spills (shown with -s / -rA)
    return json.loads(out.read_text())


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_compiles(compiled, name):
    recs = [r for r in compiled["records"] if r["case"] == name]
    assert recs, f"{name}: the launcher recorded no kernel launch"
    for r in recs:
        assert r["ok"], f"{name}: {r['kernel']} does not compile:\n{r['error']}"
        assert r["has_entry"] and r["cubin_bytes"] > 0, f"{name}: {r['kernel']} gave no kernel"
        limit = SHARED_LIMIT[r["cc"]]
        assert r["shared"] < limit, (f"{name}: {r['kernel']} needs {r['shared']} bytes of shared memory, over the "
                                     f"{limit} of sm_{r['cc']} (meta {r['meta']})")
        assert all(0 < g <= lim for g, lim in zip(r["grid"], GRID_LIMIT)), f"{name}: {r['kernel']} grid {r['grid']}"


def test_every_jit_function_is_compiled(compiled):
    cov = compiled["coverage"]
    assert set(cov) == set(MODULES)
    for module, c in cov.items():
        assert c["kernels"], f"{module}: no kernel compiled"
        assert not c["uncovered"], (f"kdfast/kernels/triton/{module}.py: @triton.jit functions {c['uncovered']} are "
                                    f"neither launched by a case in tests/kernels/triton_compile_cases.py nor called "
                                    f"by a compiled kernel: add a case")
