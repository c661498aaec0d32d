"""kdfast: fast kernels for transformer compression.

Fused knowledge-distillation losses, pruned attention and ternary matmuls,
behind one small API that drops into PyTorch and HuggingFace code.

    import kdfast
    loss = kdfast.ops.kd_loss(student_logits, teacher_logits, temperature=2.0)
    kdfast.explain("kd_loss", student_logits, teacher_logits)   # which backend, and why
    kdfast.not_supported_reasons("kd_loss", "cpu", student_logits, teacher_logits)  # every reason cpu cannot
    with kdfast.use_backend("reference"): ...                    # force one
"""
__version__ = "0.1.0"

from kdfast import _ext
from kdfast.backends import BACKENDS, BackendUnavailable, explain, not_supported_reasons, plan, use_backend
from kdfast import ops  # noqa: E402  (registers the ops)
from kdfast import nn  # noqa: E402
from kdfast import buffer_cache  # noqa: E402

if _ext.extension_error() is not None:
    _ext.warn_once()

# Subpackages the README names, imported on first use (``kdfast.compress.quantize(...)`` after
# ``import kdfast``) so that ``import kdfast`` stays fast and does not load transformers.
_SUBPACKAGES = ("compress", "hf", "qa", "distill", "active", "augment", "study", "cli")


def __getattr__(name):
    if name in _SUBPACKAGES:
        import importlib
        return importlib.import_module(f"kdfast.{name}")
    raise AttributeError(f"module 'kdfast' has no attribute {name!r}")


__all__ = ["BACKENDS", "BackendUnavailable", "explain", "not_supported_reasons", "plan", "use_backend", "ops", "nn", "buffer_cache", "__version__"]
