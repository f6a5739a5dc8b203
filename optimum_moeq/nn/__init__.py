"""Modules that replace a model's experts and, with ``attention_bits`` / ``attention_method``, its
other linears."""

from .bnb_linear import BnbInt8Linear, BnbNF4Linear
from .experts import MixedBitExperts, MixedBitOneHotExperts
from .linear import PackedLinear

REPLACEMENTS = {"top_k": MixedBitExperts, "one_hot": MixedBitOneHotExperts}
DENSE_LINEARS = {"moeq": PackedLinear, "bnb_nf4": BnbNF4Linear, "bnb_int8": BnbInt8Linear}
QUANTIZED_DENSE = tuple(DENSE_LINEARS.values())

__all__ = [
    "DENSE_LINEARS",
    "QUANTIZED_DENSE",
    "REPLACEMENTS",
    "BnbInt8Linear",
    "BnbNF4Linear",
    "MixedBitExperts",
    "MixedBitOneHotExperts",
    "PackedLinear",
]
