"""HuggingFace transformers integration.

``import kdfast.hf`` registers the ``"kdfast"`` attention implementation and
its mask function with transformers (see :mod:`kdfast.hf.attention`);
``kdfast.hf.register()`` does the same explicitly. Both are idempotent.
:func:`unpad_encoder` makes a BERT-family encoder skip padded tokens in
every layer (see :mod:`kdfast.hf.unpad`).
"""
from kdfast.hf.attention import add_observer, register, set_options
from kdfast.hf.capture import LayerCapture, capture
from kdfast.hf.unpad import UnpadHandle, is_unpadded, remove_unpad, unpad_encoder

register()

__all__ = ["add_observer", "register", "set_options", "capture", "LayerCapture", "unpad_encoder",
           "remove_unpad", "is_unpadded", "UnpadHandle"]
