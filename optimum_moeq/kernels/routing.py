"""Token-to-expert layouts for the grouped kernels, computed on the device without host syncs.

A *pair* is one (token, k) routing choice: pair p = token * top_k + k. The prefill kernel takes
pairs sorted by expert, each expert's run padded to a multiple of ``block_m`` so that a block of
rows never mixes experts. Sizes are upper bounds, so the result has a fixed shape for a given
batch (CUDA-graph friendly): padding slots hold ``num_pairs``, unused blocks hold expert -1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ExpertBlocks:
    sorted_pairs: torch.Tensor  # int32 [num_blocks * block_m]
    block_expert: torch.Tensor  # int32 [num_blocks], -1 where a block is unused
    num_pairs: int
    block_m: int


def align_pairs_by_expert(top_k_index: torch.Tensor, num_experts: int, block_m: int) -> ExpertBlocks:
    """Pairs sorted by expert in blocks of ``block_m``; an index outside [0, ``num_experts``) (a
    dropped token, or an expert held on another rank) goes to a bucket of its own whose blocks are
    marked unused."""
    experts = top_k_index.reshape(-1).long()
    experts = torch.where((experts >= 0) & (experts < num_experts), experts, num_experts)
    num_pairs = experts.numel()
    device = experts.device
    buckets = num_experts + 1
    # not bincount: on CUDA it reads the largest index back to the host to size its output
    counts = torch.zeros(buckets, dtype=torch.long, device=device).scatter_add_(0, experts, torch.ones_like(experts))
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = torch.cumsum(padded, 0)
    padded_start = padded_end - padded
    order = torch.argsort(experts, stable=True)
    sorted_experts = experts[order]
    first_of_expert = torch.cumsum(counts, 0) - counts
    rank = torch.arange(num_pairs, device=device) - first_of_expert[sorted_experts]
    max_blocks = (num_pairs + buckets * (block_m - 1)) // block_m + 1
    sorted_pairs = torch.full((max_blocks * block_m,), num_pairs, dtype=torch.int32, device=device)
    sorted_pairs[padded_start[sorted_experts] + rank] = order.to(torch.int32)
    block_starts = torch.arange(max_blocks, device=device) * block_m
    block_expert = torch.searchsorted(padded_end, block_starts, right=True)
    block_expert = torch.where(block_expert < num_experts, block_expert, -1).to(torch.int32)
    return ExpertBlocks(sorted_pairs, block_expert, num_pairs, block_m)
