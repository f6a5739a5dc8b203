"""Per-expert bit allocation: signals, rankings, bit assignment and the checkpoint scan."""

from .allocation import Allocation, LayerSignals, allocate_layers, format_table, validate_bits_mapping
from .bits import assign_bits, check_avg_bits, check_levels, level_counts
from .checkpoint import read_layer_signals, safetensors_files
from .ranking import RANKINGS, combined_rerank, rank_by_maxvar, rank_by_router, rank_experts
from .signals import max_neuron_variance, router_norm_change

__all__ = [
    "RANKINGS",
    "Allocation",
    "LayerSignals",
    "allocate_layers",
    "assign_bits",
    "check_avg_bits",
    "check_levels",
    "combined_rerank",
    "format_table",
    "level_counts",
    "max_neuron_variance",
    "rank_by_maxvar",
    "rank_by_router",
    "rank_experts",
    "read_layer_signals",
    "router_norm_change",
    "safetensors_files",
    "validate_bits_mapping",
]
