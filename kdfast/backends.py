"""Backend dispatch: the one place that decides which implementation runs.

Backends:
  reference  readable PyTorch, the specification; always available.
  cpu        compiled C++ in kdfast._C (CPU tensors).
  triton     Triton kernels (CUDA tensors; CPU tensors only when
             TRITON_INTERPRET=1, which is how tests run them without a GPU).
  cuda       compiled CUDA C++ in kdfast._C (CUDA tensors).

Automatic choice: CUDA tensors -> the op's GPU preference order (fastest
first, from the benchmarks), then reference; CPU tensors -> cpu, then
reference. A backend is forced with ``KDFAST_BACKEND=<name>`` or
``with kdfast.use_backend(name): ...``; a forced backend that cannot run
raises :class:`BackendUnavailable` and never silently falls back.

Every choice can be explained::

    >>> kdfast.explain("kd_loss", student, teacher)
    Choice(backend='cpu', rejected={'triton': 'tensors are on cpu and TRITON_INTERPRET is not 1', ...})
"""
from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch

from kdfast import _ext

BACKENDS = ("reference", "cpu", "triton", "cuda")
DEFAULT_GPU_ORDER = ("cuda", "triton")
CPU_ORDER = ("cpu",)


class BackendUnavailable(RuntimeError):
    """A forced backend cannot run the op for these inputs."""


@dataclass
class _Impl:
    fn: Callable
    check: Callable[..., str | None] | None
    kernel: str | None


@dataclass
class Choice:
    op: str
    backend: str
    forced: bool = False
    rejected: dict[str, str] = field(default_factory=dict)

    def __str__(self):
        why = "; ".join(f"{b}: {r}" for b, r in self.rejected.items())
        return f"{self.op} -> {self.backend}" + (" (forced)" if self.forced else "") + (f" [{why}]" if why else "")


_impls: dict[str, dict[str, _Impl]] = {}
_gpu_order: dict[str, tuple[str, ...]] = {}
_forced: contextvars.ContextVar = contextvars.ContextVar("kdfast_forced_backend", default=None)


def register(op: str, backend: str, *, check: Callable[..., str | None] | None = None,
             kernel: str | None = None):
    """Decorator registering ``fn`` as ``backend``'s implementation of ``op``.

    ``check(*args, **kwargs)`` returns None if the implementation can run on
    these inputs, else a short reason (dtype, shape limit...). ``kernel`` names
    the compiled op torch.ops.kdfast_C.<kernel> the implementation needs.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")

    def deco(fn):
        _impls.setdefault(op, {})[backend] = _Impl(fn, check, kernel)
        return fn

    return deco


def set_gpu_order(op: str, order: Iterable[str]):
    """Preference among GPU backends for ``op`` (fastest first, per bench/)."""
    order = tuple(order)
    bad = [b for b in order if b not in ("cuda", "triton")]
    if bad:
        raise ValueError(f"GPU order may only contain 'cuda' and 'triton', got {bad}")
    _gpu_order[op] = order


def registered_ops() -> list[str]:
    return sorted(_impls)


def _check_name(name: str, where: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{where}: unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")
    return name


@contextlib.contextmanager
def use_backend(name: str | None, ops: Iterable[str] | None = None):
    """Force ``name`` for all ops (or only ``ops``) inside the block.

    ``use_backend(None)`` restores automatic choice inside the block, even
    when KDFAST_BACKEND is set.
    """
    if name is not None:
        _check_name(name, "use_backend")
    token = _forced.set((name, None if ops is None else frozenset(ops)))
    try:
        yield
    finally:
        _forced.reset(token)


def forced_backend(op: str) -> tuple[str | None, str]:
    """(backend forced for ``op`` or None, where the force comes from)."""
    state = _forced.get()
    if state is not None:
        name, ops = state
        if ops is None or op in ops:
            return name, "use_backend()"
        return None, ""
    env = os.environ.get("KDFAST_BACKEND", "").strip()
    if env and env != "auto":
        return _check_name(env, "KDFAST_BACKEND"), "KDFAST_BACKEND"
    return None, ""


_triton_found: bool | None = None


def triton_available() -> str | None:
    """None if triton can be imported, else why not."""
    global _triton_found
    if os.environ.get("KDFAST_DISABLE_TRITON", "0") == "1":
        return "disabled by KDFAST_DISABLE_TRITON=1"
    if _triton_found is None:
        # Looked up once: find_spec costs ~60 us, which showed in every small op's dispatch.
        try:
            _triton_found = importlib.util.find_spec("triton") is not None
        except (ImportError, ValueError):  # a broken or blocked install
            _triton_found = False
    if not _triton_found:
        return "triton is not installed"
    return None


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _device_of(args, kwargs) -> torch.device:
    for a in list(args) + list(kwargs.values()):
        if isinstance(a, torch.Tensor):
            return a.device
    return torch.device("cpu")


def _generic_reason(backend: str, device: torch.device, kernel: str | None) -> str | None:
    if backend == "reference":
        return None
    if backend == "cpu":
        if device.type != "cpu":
            return f"tensors are on {device.type}, the cpu backend takes CPU tensors"
        if _ext.extension() is None:
            return f"compiled extension unavailable ({_ext.extension_error()})"
        if kernel and not _ext.has_kernel(kernel):
            return f"kernel kdfast_C::{kernel} not built"
        return None
    if backend == "cuda":
        if device.type != "cuda":
            return f"tensors are on {device.type}, the cuda backend takes CUDA tensors"
        if _ext.extension() is None:
            return f"compiled extension unavailable ({_ext.extension_error()})"
        if not _ext.build_info().get("with_cuda"):
            return "kdfast._C was built without CUDA sources"
        if kernel and not _ext.has_kernel(kernel):
            return f"kernel kdfast_C::{kernel} not built"
        return None
    if backend == "triton":
        r = triton_available()
        if r:
            return r
        if device.type == "cpu" and not triton_interpret():
            return "tensors are on cpu and TRITON_INTERPRET is not 1"
        if device.type not in ("cpu", "cuda"):
            return f"triton backend does not support {device.type} tensors"
        return None
    raise AssertionError(backend)


def _auto_order(op: str, device: torch.device) -> tuple[str, ...]:
    if device.type == "cuda":
        return _gpu_order.get(op, DEFAULT_GPU_ORDER) + ("reference",)
    if device.type == "cpu":
        return CPU_ORDER + ("reference",)
    return ("reference",)


def _reason(op: str, backend: str, device, args, kwargs) -> str | None:
    impl = _impls[op].get(backend)
    if impl is None:
        return f"no {backend} implementation of {op}"
    r = _generic_reason(backend, device, impl.kernel)
    if r is None and impl.check is not None and args is not None:
        r = impl.check(*args, **kwargs)
    return r


def explain(op: str, *args, **kwargs) -> Choice:
    """Which backend runs ``op`` on these inputs, and why each other was not chosen."""
    if op not in _impls:
        raise KeyError(f"unknown op {op!r}; registered: {', '.join(registered_ops())}")
    device = _device_of(args, kwargs)
    forced, source = forced_backend(op)
    if forced is not None:
        r = _reason(op, forced, device, args, kwargs)
        if r is not None:
            raise BackendUnavailable(
                f"kdfast: backend '{forced}' is forced by {source} for op '{op}' but cannot run: {r}. "
                "Unset the force or pick another backend (python -m kdfast.info lists them)."
            )
        return Choice(op, forced, forced=True)
    rejected = {}
    chosen = None
    for b in _auto_order(op, device):
        r = _reason(op, b, device, args, kwargs)
        if r is None and chosen is None:
            chosen = b
        elif r is not None:
            rejected[b] = r
    for b in BACKENDS:
        if b not in rejected and b != chosen:
            r = _reason(op, b, device, args, kwargs)
            rejected[b] = r if r is not None else "not preferred for this device"
    assert chosen is not None  # reference never refuses
    return Choice(op, chosen, rejected=rejected)


def choose(op: str, *args, **kwargs) -> str:
    """The backend explain() would pick, without collecting every rejection reason (hot path)."""
    forced, _ = forced_backend(op)
    if forced is not None:
        return explain(op, *args, **kwargs).backend  # raises with the reason if it cannot run
    device = _device_of(args, kwargs)
    for b in _auto_order(op, device):
        if _reason(op, b, device, args, kwargs) is None:
            return b
    return "reference"


def plan(op: str, device: str | torch.device) -> Choice:
    """Like explain() without inputs: what would run on ``device`` for typical inputs."""
    device = torch.device(device)
    rejected, chosen = {}, None
    for b in _auto_order(op, device):
        r = _reason(op, b, device, None, None)
        if r is None and chosen is None:
            chosen = b
        elif r is not None:
            rejected[b] = r
    return Choice(op, chosen or "reference", rejected=rejected)


def run(op: str, *args, backend: str | None = None, **kwargs) -> Any:
    """Run ``op`` on the chosen backend (or on ``backend`` when given; it must be able to run)."""
    if backend is None:
        backend = choose(op, *args, **kwargs)
    else:
        r = _reason(op, _check_name(backend, "run"), _device_of(args, kwargs), args, kwargs)
        if r is not None:
            raise BackendUnavailable(f"kdfast: backend '{backend}' cannot run op '{op}': {r}")
    if backend in ("cpu", "cuda"):
        _ext.warn_once()
    return _impls[op][backend].fn(*args, **kwargs)
