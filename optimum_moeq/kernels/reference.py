"""Torch reference path: unpack, dequantize, matmul. The CPU path and the oracle for kernels."""

from __future__ import annotations

import torch

from ..quant.packed import PackedProjection
from ..quant.packing import unpack_codes


def dequantize_packed(packed: PackedProjection) -> torch.Tensor:
    """Full weight ``[..., N, K]`` in float32 from the kernel layout."""
    codes = unpack_codes(packed.q2, packed.q1, packed.bits).float()  # [..., K, N]
    group_size = codes.shape[-2] // packed.scale.shape[-2]
    scale = packed.scale.float().repeat_interleave(group_size, dim=-2)
    zero = packed.zero.float().repeat_interleave(group_size, dim=-2)
    return ((codes - zero) * scale).transpose(-1, -2)


def packed_linear(x: torch.Tensor, packed: PackedProjection) -> torch.Tensor:
    """``x @ W.T`` for one expert's packed weight, returned in ``x``'s dtype. Computed in float32
    from the exact weights: a bf16 copy of the weight would round each one by up to 2^-9, an error
    the packed format does not have and the kernels do not make."""
    return torch.nn.functional.linear(x.float(), dequantize_packed(packed)).to(x.dtype)
