"""Compute paths over packed weights: the torch reference (CPU, test oracle)."""

from .reference import dequantize_packed, packed_linear

__all__ = ["dequantize_packed", "packed_linear"]
