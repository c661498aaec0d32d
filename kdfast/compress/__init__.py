"""Model-level compression transforms (quantize, prune, compact, save/load)."""
from kdfast.compress.quantize import freeze, load_quantized, quantize, save_quantized

__all__ = ["quantize", "freeze", "save_quantized", "load_quantized"]
