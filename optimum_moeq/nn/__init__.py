"""Modules that replace a model's experts."""

from .experts import MixedBitExperts, MixedBitOneHotExperts

REPLACEMENTS = {"top_k": MixedBitExperts, "one_hot": MixedBitOneHotExperts}

__all__ = ["REPLACEMENTS", "MixedBitExperts", "MixedBitOneHotExperts"]
