"""Compile every layer-KD Triton kernel for sm_90 without a GPU (PTX and cubin through Triton's
own toolchain), so what the interpreter does not check (globals, dtypes, layouts) is checked.

Runs in a subprocess: the test session sets TRITON_INTERPRET=1, under which @triton.jit
gives interpreter objects that cannot be compiled.
"""
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

SCRIPT = r'''
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kdfast.kernels.triton import layer_kd as k

TYPES = {"QS": "*bf16", "KS": "*bf16", "QT": "*fp32", "KT": "*fp16", "MASK": "*fp32", "ROWS": "*fp32",
         "LSE": "*fp32", "DQ": "*fp32", "DK": "*fp32", "scale_s": "fp32", "scale_t": "fp32", "X": "*fp32",
         "G": "*fp32", "OUT": "*fp32", "scale": "fp32", "Y": "*fp32", "T": "*bf16", "eps": "fp32"}
KL = {"L": 384, "BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_DS": 64, "BLOCK_DT": 128}
CASES = [
    (k._kl_fwd_kernel, KL), (k._kl_dq_kernel, KL), (k._kl_dk_kernel, KL),
    (k._gram_kernel, {"L": 97, "E": 112, "BLOCK_L": 32, "BLOCK_E": 32}),
    (k._rows_times_kernel, {"L": 97, "E": 112, "BLOCK_L": 32, "BLOCK_E": 32, "BLOCK_D": 64}),
    (k._hidden_epilogue_kernel, {"DT": 768, "KIND": 0, "BLOCK_D": 128}),
    (k._hidden_epilogue_kernel, {"DT": 1000, "KIND": 1, "BLOCK_D": 128}),
]
for fn, meta in CASES:
    sig = {n: ("constexpr" if n in meta else TYPES.get(n, "i32")) for n in fn.arg_names}
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(c),): v for c, v in meta.items()})
    c = triton.compile(src, target=GPUTarget("cuda", 90, 32))
    assert ".entry" in c.asm["ptx"], fn.__name__
    print("compiled", fn.__name__)
'''


def test_triton_kernels_compile_for_sm90():
    try:
        import triton.backends.nvidia.compiler  # noqa: F401
    except ImportError as e:  # pragma: no cover - triton builds without the NVIDIA backend
        pytest.skip(f"triton has no NVIDIA backend: {e}")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", SCRIPT], cwd=root, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("compiled") == 7
