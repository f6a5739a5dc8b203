"""Tensor-parallel slices of packed experts (plain torch; no vLLM).

Tensor parallelism splits the experts' intermediate dimension I over ranks, as vLLM does for
its own MoE weights: gate_up_proj by output rows (the gate half and the up half each split, so a
rank holds [gate_r; up_r]), down_proj by input columns. Packed tensors keep N (outputs) on their
last axis, so an output split is a slice of every field there. Inputs are packed along axis -2
(16 per 2-bit-plane word, 32 per 1-bit-plane word, one scale and zero per group), so an input
split must fall on a group and on a 32-input block. Integer zeros (format 2) are packed along N
instead: their output split is taken on the unpacked values and packed again.
"""

from __future__ import annotations

import math

import torch

from ..quant.packing import pack_zero_codes, unpack_zero_codes


def check_tensor_parallel(
    split_size: int, group_size: int, tp_size: int, name: str = "experts", what: str = "intermediate features"
) -> None:
    """Raise ValueError, naming the values, unless ``tp_size`` ranks can split ``split_size`` packed
    inputs (the experts' intermediate features, which down_proj takes in; a row-parallel linear's
    inputs)."""
    if tp_size < 1 or split_size % tp_size:
        raise ValueError(f"{name}: tensor parallel size {tp_size} does not divide its {split_size} {what}.")
    per_rank, block = split_size // tp_size, math.lcm(group_size, 32)
    if per_rank % block:
        allowed = [t for t in range(1, split_size // block + 1) if (split_size // block) % t == 0]
        raise ValueError(
            f"{name}: tensor parallel size {tp_size} gives each rank {per_rank} of the {split_size} {what}, but "
            f"packed weights can only be split on their inputs' groups of {group_size} and 32-input blocks "
            f"(multiples of {block}); tensor parallel sizes allowed here: {allowed}."
        )


def shard_packed(tensor: torch.Tensor, proj: str, rank: int, tp_size: int, gated: bool = True) -> torch.Tensor:
    """This rank's slice of one stored field of ``proj`` for all experts of a width: ``tensor`` is
    [E_b, ..., N] as saved (N = 2I for a gated input projection, else I; down_proj's inputs on
    axis -2). Call ``check_tensor_parallel`` first."""
    if tp_size == 1:
        return tensor
    if proj == "down_proj":
        per = tensor.shape[-2] // tp_size
        return tensor.narrow(-2, rank * per, per)
    if not gated:
        per = tensor.shape[-1] // tp_size
        return tensor.narrow(-1, rank * per, per)
    half = tensor.shape[-1] // 2
    per = half // tp_size
    return torch.cat([tensor.narrow(-1, rank * per, per), tensor.narrow(-1, half + rank * per, per)], dim=-1)


def shard_zero_codes(
    tensor: torch.Tensor, bits: int, n_full: int, proj: str, rank: int, tp_size: int, gated: bool = True
) -> torch.Tensor:
    """This rank's slice of a stored integer-zero field ([E_b, K/G, zero_words]) of ``proj``, whose
    whole projection has ``n_full`` outputs: split as :func:`shard_packed` splits the values."""
    if tp_size == 1 or proj == "down_proj":  # down_proj splits its groups (axis -2), whole rows of words
        return shard_packed(tensor, proj, rank, tp_size, gated)
    values = unpack_zero_codes(tensor, bits, n_full)
    return pack_zero_codes(shard_packed(values, proj, rank, tp_size, gated), bits)
