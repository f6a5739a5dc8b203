"""Group-wise asymmetric round-to-nearest: W ~ (Q - z) * s, groups along the input dimension."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .packing import check_bits

# Scales and zeros are stored in float16: more mantissa than bfloat16, and enough range for
# weights. An all-zero group would have a zero scale; the floor keeps 1/s finite.
METADATA_DTYPE = torch.float16
_MIN_SCALE = 2.0**-24


@dataclass
class GroupQuantized:
    """Codes ``[..., N, K]`` (int32) with per-group ``scale`` and ``zero`` ``[..., N, K/G]``."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    group_size: int


def check_group_size(group_size: int, k: int, name: str = "weight") -> None:
    if k % group_size:
        raise ValueError(
            f"group_size={group_size} does not divide the input dimension {k} of {name}: "
            f"choose a group_size that divides {k} (e.g. {_largest_divisor(k, group_size)})."
        )


def _largest_divisor(k: int, upper: int) -> int:
    return max(d for d in range(1, min(k, upper) + 1) if k % d == 0)


def _grouped(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    *lead, n, k = weight.shape
    check_group_size(group_size, k)
    return weight.reshape(*lead, n, k // group_size, group_size)


def codes_for(weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Nearest codes for ``weight`` under given (stored-precision) scales and zeros."""
    group_size = weight.shape[-1] // scale.shape[-1]
    w = _grouped(weight.float(), group_size)
    s, z = scale.float().unsqueeze(-1), zero.float().unsqueeze(-1)
    q = torch.round(w / s + z).clamp_(0, 2**bits - 1)
    return q.reshape(weight.shape).to(torch.int32)


def quantize_rtn(weight: torch.Tensor, bits: int, group_size: int, integer_zero: bool = False) -> GroupQuantized:
    """Asymmetric quantization of ``weight`` ``[..., N, K]`` per group of ``group_size`` over the
    group's min-max range extended to include 0; ``integer_zero`` rounds the zero point to the
    nearest code (as GPTQ's format stores it: b bits instead of 16)."""
    check_bits(bits)
    w = _grouped(weight.float(), group_size)
    # The grid spans 0 as well, so the zero point is a code (0 .. 2**bits - 1): a group of near-equal
    # values far from 0 would otherwise need a zero past float16's range (inf, then NaN outputs).
    wmin, wmax = w.amin(dim=-1).clamp(max=0), w.amax(dim=-1).clamp(min=0)
    scale = ((wmax - wmin) / (2**bits - 1)).clamp_(min=_MIN_SCALE).to(METADATA_DTYPE)
    zero = -wmin / scale.float()
    zero = (zero.round().clamp_(0, 2**bits - 1) if integer_zero else zero).to(METADATA_DTYPE)
    # Codes are chosen against the rounded metadata actually stored, not the exact values.
    return GroupQuantized(codes_for(weight, scale, zero, bits), scale, zero, bits, group_size)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """``(codes - zero) * scale`` in float32, codes ``[..., N, K]``, metadata ``[..., N, K/G]``."""
    group_size = codes.shape[-1] // scale.shape[-1]
    q = _grouped(codes.float(), group_size)
    w = (q - zero.float().unsqueeze(-1)) * scale.float().unsqueeze(-1)
    return w.reshape(codes.shape)
