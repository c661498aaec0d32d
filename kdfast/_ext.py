"""Loading of the compiled extension kdfast._C.

`import kdfast` never fails because the extension is missing or broken: the
problem is recorded, reported once as a warning, and shown by
`python -m kdfast.info`; ops then run on the reference (or Triton) backend.
"""
from __future__ import annotations

import json
import os
import warnings

import torch

_C = None
_error: str | None = None
_warned = False


def _build_info_file() -> dict | None:
    path = os.path.join(os.path.dirname(__file__), "_build_info.json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _load():
    global _C, _error
    if os.environ.get("KDFAST_DISABLE_EXTENSION", "0") == "1":
        _error = "disabled by KDFAST_DISABLE_EXTENSION=1"
        return
    try:
        from kdfast import _C as mod  # noqa: PLC0415
    except ImportError as e:
        built = _build_info_file()
        if built and built.get("torch_version") != torch.__version__:
            _error = (
                f"kdfast._C was built against torch {built['torch_version']} but torch "
                f"{torch.__version__} is installed; rebuild with "
                "`pip install --no-build-isolation .` ({e})"
            )
        elif built is None:
            _error = f"kdfast._C is not built ({e}); install with `pip install --no-build-isolation .`"
        else:
            _error = f"kdfast._C failed to load: {e}"
        return
    info = mod.build_info()
    if info["torch_version"] != torch.__version__:
        _error = (
            f"kdfast._C was built against torch {info['torch_version']} but torch "
            f"{torch.__version__} is running; rebuild with `pip install --no-build-isolation .`"
        )
        return
    _C = mod


_load()


def extension():
    """The loaded kdfast._C module, or None (see `extension_error()`)."""
    return _C


def extension_error() -> str | None:
    return _error


def warn_once():
    global _warned
    if _error is not None and not _warned:
        _warned = True
        warnings.warn(f"kdfast: compiled kernels unavailable, using fallbacks: {_error}", stacklevel=3)


def has_kernel(name: str) -> bool:
    """True if the compiled op torch.ops.kdfast_C.<name> is registered."""
    if _C is None:
        return False
    return hasattr(torch.ops.kdfast_C, name)


def build_info() -> dict:
    if _C is None:
        return {}
    info = dict(_C.build_info())
    extra = _build_info_file() or {}
    for k in ("cuda_archs", "torch_cuda_version", "native", "debug", "machine"):
        if k in extra:
            info[k] = extra[k]
    return info
