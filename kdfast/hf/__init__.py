"""HuggingFace transformers integration.

``import kdfast.hf`` registers the ``"kdfast"`` attention implementation and
its mask function with transformers (see :mod:`kdfast.hf.attention`);
``kdfast.hf.register()`` does the same explicitly. Both are idempotent.
"""
from kdfast.hf.attention import add_observer, register, set_options
from kdfast.hf.capture import LayerCapture, capture

register()

__all__ = ["add_observer", "register", "set_options", "capture", "LayerCapture"]
