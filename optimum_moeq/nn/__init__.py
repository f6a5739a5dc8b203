"""Modules that replace a model's experts and, with ``attention_bits`` / ``attention_method``, its
other linears, and the one path that builds and swaps them in."""

from .bnb_linear import BnbInt8Linear, BnbNF4Linear
from .experts import MixedBitExperts, MixedBitOneHotExperts
from .linear import PackedLinear
from .replace import (
    DENSE_LINEARS,
    QUANTIZED_DENSE,
    QUANTIZED_MODULES,
    REPLACEMENTS,
    build_dense_linear,
    build_experts_module,
    original_module,
    replace_with_mixed_bit_experts,
    replace_with_quantized_linears,
    swap_module,
)

__all__ = [
    "DENSE_LINEARS",
    "QUANTIZED_DENSE",
    "QUANTIZED_MODULES",
    "REPLACEMENTS",
    "BnbInt8Linear",
    "BnbNF4Linear",
    "MixedBitExperts",
    "MixedBitOneHotExperts",
    "PackedLinear",
    "build_dense_linear",
    "build_experts_module",
    "original_module",
    "replace_with_mixed_bit_experts",
    "replace_with_quantized_linears",
    "swap_module",
]
