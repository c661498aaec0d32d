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

What each backend's kernel accepts (dtypes, shape limits, argument values) is
declared as data, a :class:`Limits` per (op, backend) given to
:func:`register`; :func:`not_supported_reasons` lists every reason a backend
cannot run an op on given inputs (device, build, limits, the op's own check),
and explain() reports them for each backend it skips.
"""
from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import inspect
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch

from kdfast import _ext

BACKENDS = ("reference", "cpu", "triton", "cuda")
DEFAULT_GPU_ORDER = ("cuda", "triton")
CPU_ORDER = ("cpu",)


class BackendUnavailable(RuntimeError):
    """A forced backend cannot run the op for these inputs."""


# The floating-point dtypes the compiled and Triton kernels take (float64 runs the reference).
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def kernel_dtypes(*names: str, dtypes: tuple[torch.dtype, ...] = KERNEL_DTYPES) -> dict[str, tuple]:
    """``{name: dtypes}`` for Limits.dtypes: these arguments must have one of ``dtypes``."""
    return {n: dtypes for n in names}


def _dtype_names(dtypes) -> str:
    return "/".join(str(d).replace("torch.", "") for d in dtypes)


@dataclass(frozen=True)
class Limits:
    """What one backend's kernel of an op accepts, by argument name (arguments that are None or
    not passed are not checked).

    dtypes:    {argument: allowed dtypes}
    max_size:  {(argument, dim): largest size of that dim}
    same_size: ((argument, dim), (argument, dim)) pairs that must be equal
    values:    {argument: allowed values}
    """
    dtypes: Mapping[str, tuple[torch.dtype, ...]] = field(default_factory=dict)
    max_size: Mapping[tuple[str, int], int] = field(default_factory=dict)
    same_size: tuple[tuple[tuple[str, int], tuple[str, int]], ...] = ()
    values: Mapping[str, tuple] = field(default_factory=dict)

    def names(self) -> set[str]:
        return ({*self.dtypes, *self.values} | {n for n, _ in self.max_size}
                | {n for pair in self.same_size for n, _ in pair})

    def reasons(self, get: Callable[[str], Any]) -> Iterator[str]:
        """Every way the arguments (``get(name)``: the value or None) break these limits."""
        for name, allowed in self.dtypes.items():
            x = get(name)
            if x is not None and x.dtype not in allowed:
                yield f"{name} dtype {x.dtype} not supported by kernels ({_dtype_names(allowed)})"
        for (name, dim), limit in self.max_size.items():
            x = get(name)
            if x is not None and x.dim() > 0 and x.shape[dim] > limit:
                yield f"{name}.shape[{dim}] = {x.shape[dim]} is over the kernel's limit of {limit}"
        for (a, da), (b, db) in self.same_size:
            x, y = get(a), get(b)
            if x is not None and y is not None and x.shape[da] != y.shape[db]:
                yield f"kernels need {a}.shape[{da}] == {b}.shape[{db}], got {x.shape[da]} and {y.shape[db]}"
        for name, allowed in self.values.items():
            v = get(name)
            if v not in allowed:
                yield f"{name}={v!r} has no kernel (supported: {', '.join(map(repr, allowed))})"


@dataclass
class _Impl:
    fn: Callable
    check: Callable[..., str | None] | None
    kernel: str | None
    limits: Limits | None = None
    arg_index: dict[str, int] = field(default_factory=dict)  # positions of the arguments limits names

    def __post_init__(self):
        # The hot path's test (choose()) as (position, name, ...) rules; the full explanation is
        # only built when a limit is broken.
        lim, at = self.limits, self.arg_index
        self._rules = () if lim is None else (
            tuple((at[n], n, d) for n, d in lim.dtypes.items()),
            tuple((at[n], n, dim, m) for (n, dim), m in lim.max_size.items()),
            tuple((at[a], a, da, at[b], b, db) for (a, da), (b, db) in lim.same_size),
            tuple((at[n], n, v) for n, v in lim.values.items()))

    def within_limits(self, args, kwargs) -> bool:
        if not self._rules:
            return True
        n = len(args)

        def arg(i, name):
            return args[i] if i < n else kwargs.get(name)

        dtypes, sizes, same, values = self._rules
        for i, name, allowed in dtypes:
            x = arg(i, name)
            if x is not None and x.dtype not in allowed:
                return False
        for i, name, dim, m in sizes:
            x = arg(i, name)
            if x is not None and x.dim() > 0 and x.shape[dim] > m:
                return False
        for i, a, da, j, b, db in same:
            x, y = arg(i, a), arg(j, b)
            if x is not None and y is not None and x.shape[da] != y.shape[db]:
                return False
        return all(arg(i, name) in allowed for i, name, allowed in values)

    def limit_reasons(self, args, kwargs) -> Iterator[str]:
        if self.limits is None:
            return iter(())

        def get(name):
            i = self.arg_index[name]
            return args[i] if i < len(args) else kwargs.get(name)

        return self.limits.reasons(get)


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


def _positions(fn: Callable) -> dict[str, int]:
    params = inspect.signature(fn).parameters.values()
    return {p.name: i for i, p in enumerate(params) if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)}


def register(op: str, backend: str, *, check: Callable[..., str | None] | None = None,
             kernel: str | None = None, limits: Limits | None = None):
    """Decorator registering ``fn`` as ``backend``'s implementation of ``op``.

    ``limits`` declares what the kernel accepts (see :class:`Limits`; argument names are
    those of ``fn``, or of the op's reference implementation when ``fn`` takes ``*args``).
    ``check(*args, **kwargs)`` covers what data cannot say: None if the implementation can
    run on these inputs, else a short reason. ``kernel`` names the compiled op
    torch.ops.kdfast_C.<kernel> the implementation needs.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")

    def deco(fn):
        index = {}
        if limits is not None:
            index = _positions(fn)
            if not index and "reference" in _impls.get(op, {}):
                index = _positions(_impls[op]["reference"].fn)
            unknown = limits.names() - set(index)
            if unknown:
                raise ValueError(f"limits of {op}/{backend} name arguments {sorted(unknown)} that "
                                 f"{fn.__name__} does not take")
        _impls.setdefault(op, {})[backend] = _Impl(fn, check, kernel, limits, index)
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


def _generic_reasons(backend: str, device: torch.device, kernel: str | None) -> list[str]:
    """Device, build and install reasons (no inputs needed), most basic first."""
    if backend == "reference":
        return []
    out = []
    if backend in ("cpu", "cuda"):
        if device.type != backend:
            out.append(f"tensors are on {device.type}, the {backend} backend takes {backend.upper()} tensors")
        if _ext.extension() is None:
            out.append(f"compiled extension unavailable ({_ext.extension_error()})")
        elif backend == "cuda" and not _ext.build_info().get("with_cuda"):
            out.append("kdfast._C was built without CUDA sources")
        elif kernel and not _ext.has_kernel(kernel):
            out.append(f"kernel kdfast_C::{kernel} not built")
        return out
    if backend == "triton":
        r = triton_available()
        if r:
            out.append(r)
        if device.type == "cpu" and not triton_interpret():
            out.append("tensors are on cpu and TRITON_INTERPRET is not 1")
        elif device.type not in ("cpu", "cuda"):
            out.append(f"triton backend does not support {device.type} tensors")
        return out
    raise AssertionError(backend)


def _generic_reason(backend: str, device: torch.device, kernel: str | None) -> str | None:
    """The first of _generic_reasons (None: the backend is usable on ``device``)."""
    r = _generic_reasons(backend, device, kernel)
    return r[0] if r else None


def _auto_order(op: str, device: torch.device) -> tuple[str, ...]:
    if device.type == "cuda":
        return _gpu_order.get(op, DEFAULT_GPU_ORDER) + ("reference",)
    if device.type == "cpu":
        return CPU_ORDER + ("reference",)
    return ("reference",)


def _reasons(op: str, backend: str, device, args, kwargs) -> list[str]:
    impl = _impls[op].get(backend)
    if impl is None:
        return [f"no {backend} implementation of {op}"]
    out = _generic_reasons(backend, device, impl.kernel)
    if args is None:  # plan(): no inputs to check
        return out
    out.extend(impl.limit_reasons(args, kwargs))
    if impl.check is not None:
        r = impl.check(*args, **kwargs)
        if r is not None:
            out.append(r)
    return out


def _reason(op: str, backend: str, device, args, kwargs) -> str | None:
    """The first reason ``backend`` cannot run ``op`` (None: it can); what choose() asks, so it
    stops at the first failing rule."""
    impl = _impls[op].get(backend)
    if impl is None:
        return f"no {backend} implementation of {op}"
    r = _generic_reasons(backend, device, impl.kernel)
    if r:
        return r[0]
    if args is None:
        return None
    if impl.limits is not None and not impl.within_limits(args, kwargs):
        return next(impl.limit_reasons(args, kwargs))
    return impl.check(*args, **kwargs) if impl.check is not None else None


def _all_reasons(op: str, backend: str, device, args, kwargs) -> str | None:
    return "; ".join(_reasons(op, backend, device, args, kwargs)) or None


def not_supported_reasons(op: str, backend: str, *args, **kwargs) -> list[str]:
    """Every reason ``backend`` cannot run ``op`` on these inputs (empty: it can): device, build,
    the kernel's declared :class:`Limits` and the op's own check."""
    if op not in _impls:
        raise KeyError(f"unknown op {op!r}; registered: {', '.join(registered_ops())}")
    return list(_reasons(op, _check_name(backend, "not_supported_reasons"), _device_of(args, kwargs), args, kwargs))


def explain(op: str, *args, **kwargs) -> Choice:
    """Which backend runs ``op`` on these inputs, and why each other was not chosen."""
    if op not in _impls:
        raise KeyError(f"unknown op {op!r}; registered: {', '.join(registered_ops())}")
    device = _device_of(args, kwargs)
    forced, source = forced_backend(op)
    if forced is not None:
        r = _all_reasons(op, forced, device, args, kwargs)
        if r is not None:
            raise BackendUnavailable(
                f"kdfast: backend '{forced}' is forced by {source} for op '{op}' but cannot run: {r}. "
                "Unset the force or pick another backend (python -m kdfast.info lists them)."
            )
        return Choice(op, forced, forced=True)
    rejected = {}
    chosen = None
    for b in _auto_order(op, device):
        r = _all_reasons(op, b, device, args, kwargs)
        if r is None and chosen is None:
            chosen = b
        elif r is not None:
            rejected[b] = r
    for b in BACKENDS:
        if b not in rejected and b != chosen:
            r = _all_reasons(op, b, device, args, kwargs)
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
        r = _all_reasons(op, _check_name(backend, "run"), _device_of(args, kwargs), args, kwargs)
        if r is not None:
            raise BackendUnavailable(f"kdfast: backend '{backend}' cannot run op '{op}': {r}")
    if backend in ("cpu", "cuda"):
        _ext.warn_once()
    return _impls[op][backend].fn(*args, **kwargs)
