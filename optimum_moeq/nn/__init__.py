"""Modules that replace a model's experts and, with ``attention_bits``, its other linears."""

from .experts import MixedBitExperts, MixedBitOneHotExperts
from .linear import PackedLinear

REPLACEMENTS = {"top_k": MixedBitExperts, "one_hot": MixedBitOneHotExperts}

__all__ = ["REPLACEMENTS", "MixedBitExperts", "MixedBitOneHotExperts", "PackedLinear"]
