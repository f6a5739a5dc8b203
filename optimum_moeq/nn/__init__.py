"""Modules that replace a model's experts."""

from .experts import MixedBitExperts

__all__ = ["MixedBitExperts"]
