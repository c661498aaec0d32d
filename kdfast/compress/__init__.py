"""Model-level compression transforms: ternary quantization, structured pruning,
compaction, and saving/loading the compressed models."""
from kdfast.compress.quantize import freeze, load_quantized, quantize, save_quantized
from kdfast.compress.compact import compact
from kdfast.compress.prune import PruningGates, add_gates, remove_gates
from kdfast.compress.pruned_io import load_pruned, save_pruned

__all__ = ["quantize", "freeze", "save_quantized", "load_quantized", "add_gates", "remove_gates", "PruningGates",
           "compact", "save_pruned", "load_pruned"]
