"""Model transforms for compression (pruning; other families append here)."""
from kdfast.compress.compact import compact
from kdfast.compress.prune import PruningGates, add_gates, remove_gates
from kdfast.compress.pruned_io import load_pruned, save_pruned

__all__ = ["add_gates", "remove_gates", "PruningGates", "compact", "save_pruned", "load_pruned"]
