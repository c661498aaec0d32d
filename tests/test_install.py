"""Import without the extension or triton, `python -m kdfast.info`, build metadata, ISA control."""
import json
import os
import subprocess
import sys

import pytest
import torch

import kdfast
from kdfast import _ext

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code, **env):
    e = dict(os.environ, PYTHONPATH=ROOT, **env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=e, cwd=ROOT,
                          timeout=120)


def test_import_without_extension_warns_once_and_uses_reference():
    code = (
        "import warnings, torch\n"
        "warnings.simplefilter('always')\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    import kdfast\n"
        "    s = torch.randn(3, 11) * 10; t = torch.randn(3, 11) * 10\n"
        "    l1 = kdfast.ops.kd_loss(s, t); l2 = kdfast.ops.kd_loss(s, t)\n"
        "print('warnings', sum('compiled kernels unavailable' in str(x.message) for x in w))\n"
        "c = kdfast.explain('kd_loss', s, t)\n"
        "print('backend', c.backend); print('why', c.rejected['cpu'])\n"
        "print('loss', float(l1))\n"
    )
    r = _run(code, KDFAST_DISABLE_EXTENSION="1")
    assert r.returncode == 0, r.stderr
    assert "warnings 1" in r.stdout
    assert "backend reference" in r.stdout
    assert "compiled extension unavailable (disabled by KDFAST_DISABLE_EXTENSION=1)" in r.stdout


def test_import_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, kdfast\n"
        "s = torch.randn(3, 11); t = torch.randn(3, 11)\n"
        "print('why', kdfast.explain('kd_loss', s, t).rejected['triton'])\n"
        "with kdfast.use_backend('triton'):\n"
        "    try:\n"
        "        kdfast.ops.kd_loss(s, t)\n"
        "    except kdfast.BackendUnavailable as e:\n"
        "        print('raised', e)\n"
    )
    r = _run(code, TRITON_INTERPRET="1")
    assert r.returncode == 0, r.stderr
    assert "why triton is not installed" in r.stdout
    assert "raised kdfast: backend 'triton' is forced" in r.stdout


def test_import_touches_no_gpu():
    code = (
        "import torch\n"
        "def boom(*a, **k): raise RuntimeError('GPU queried at import')\n"
        "torch.cuda.is_available = boom; torch.cuda.device_count = boom; torch.cuda.init = boom\n"
        "torch.cuda.get_device_name = boom\n"
        "import kdfast, kdfast.ops, kdfast.nn\n"
        "print('ok')\n"
    )
    r = _run(code)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


def test_info_tells_what_was_built():
    r = subprocess.run([sys.executable, "-m", "kdfast.info"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert f"torch {torch.__version__}" in out
    assert "kd_loss" in out and "backends:" in out
    if _ext.extension() is not None:
        from kdfast import cpu_isa
        assert "extension kdfast._C: loaded" in out
        assert f"hardware {cpu_isa.hardware_isa()}" in out
        assert "cuda sources: False" in out or torch.version.cuda is not None
    r2 = subprocess.run([sys.executable, "-m", "kdfast.info"], capture_output=True, text=True, cwd=ROOT,
                        env=dict(os.environ, KDFAST_DISABLE_EXTENSION="1"), timeout=120)
    assert "extension kdfast._C: unavailable: disabled by KDFAST_DISABLE_EXTENSION=1" in r2.stdout


@pytest.mark.cpu
def test_build_metadata_matches_running_torch():
    info = _ext.build_info()
    assert info["torch_version"] == torch.__version__
    assert info["openmp"] is True
    with open(os.path.join(os.path.dirname(kdfast.__file__), "_build_info.json")) as f:
        recorded = json.load(f)
    assert recorded["torch_version"] == torch.__version__
    assert recorded["cpu_isa_paths"] == info["cpu_isa_paths"]
    assert recorded["with_cuda"] == info["with_cuda"]


@pytest.mark.cpu
def test_cpu_isa_control():
    from kdfast import cpu_isa
    avail = cpu_isa.available_isas()
    assert avail[0] == "scalar" and cpu_isa.hardware_isa() == avail[-1]
    before = cpu_isa.current_isa()  # the hardware's best, or the KDFAST_CPU_ISA cap when set
    for isa in avail:
        with cpu_isa.use_cpu_isa(isa):
            assert cpu_isa.current_isa() == isa
    assert cpu_isa.current_isa() == before
    with pytest.raises(ValueError, match="unknown ISA 'sse9'"):
        with cpu_isa.use_cpu_isa("sse9"):
            pass
    r = _run("from kdfast import cpu_isa; print(cpu_isa.current_isa())", KDFAST_CPU_ISA="scalar")
    assert r.stdout.strip() == "scalar", r.stderr
