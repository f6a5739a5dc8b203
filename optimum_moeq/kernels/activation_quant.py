"""Activations quantized per block of rows for the integer-dot-product decode kernel.

Each row of ``x`` [R, K] is cut into blocks of ``block_k`` values (the kernel's K step, one weight
group or a power-of-two part of one). A block gets a float32 scale and integer values q with
x ~ scale * q: int8 (``digits=1``, |q| <= 127) or two int8 digits q = 128 hi + lo (``digits=2``,
|q| <= 16256, about 15 bits: near exact for bf16 and fp16 activations). The values are packed in
the order the kernel's masked weight words need (``triton_moe``'s dp4a section):

* ``xp2`` [R, K / 16, 4 * digits] int32: for 16-row word w, position j and digit d, the int32 at
  d * 4 + j holds rows 16 w + 4 b + j in its bytes b = 0..3;
* ``xp1`` [R, K / 32, 8 * digits] int32: for 32-row word w, position j, rows 32 w + 8 b + j.

``x_sum`` [R, K / block_k] float32 is each block's sum of q (exact: |sum| < 2^24), through which the
weights' zero point folds out of the inner loop.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

DIGIT_RANGE = {1: 127, 2: 127 * 128}  # largest |q|
_HI = 128  # weight of the high digit


class QuantizedActivations(NamedTuple):
    xp2: torch.Tensor
    xp1: torch.Tensor
    x_scale: torch.Tensor
    x_sum: torch.Tensor


def quantize_activations(x: torch.Tensor, block_k: int, digits: int = 1) -> QuantizedActivations:
    """``x`` [R, K] (any float dtype) quantized per block of ``block_k`` rows and packed for the
    kernel; ``block_k`` a multiple of 32 dividing K."""
    if digits not in DIGIT_RANGE:
        raise ValueError(f"digits={digits!r} is not supported: allowed are 1 (int8) and 2 (two int8 digits).")
    rows, k = x.shape
    if block_k % 32 or k % block_k:
        raise ValueError(f"block_k={block_k} must be a multiple of 32 dividing K={k}.")
    blocks = x.float().view(rows, k // block_k, block_k)
    largest = blocks.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(largest > 0, largest / DIGIT_RANGE[digits], torch.ones_like(largest))
    q = torch.round(blocks / scale).to(torch.int32).view(rows, k)
    x_sum = q.view(rows, k // block_k, block_k).sum(dim=-1, dtype=torch.int32).float()
    parts = [q] if digits == 1 else [torch.div(q + _HI // 2, _HI, rounding_mode="floor")]
    if digits == 2:
        parts.append(q - _HI * parts[0])  # lo in [-64, 63]
    xp2 = torch.stack([_pack(p.to(torch.int8), 16, 4) for p in parts], dim=2).view(rows, k // 16, 4 * digits)
    xp1 = torch.stack([_pack(p.to(torch.int8), 32, 8) for p in parts], dim=2).view(rows, k // 32, 8 * digits)
    return QuantizedActivations(xp2, xp1, scale.view(rows, k // block_k), x_sum)


def _pack(q: torch.Tensor, word_rows: int, positions: int) -> torch.Tensor:
    """int8 [R, K] -> int32 [R, K / word_rows, positions]: rows word * word_rows + positions * b + j
    in byte b of entry j (little-endian bytes, as the GPU reads an int32)."""
    rows, k = q.shape
    grouped = q.view(rows, k // word_rows, 4, positions).transpose(-1, -2).contiguous()  # [.., j, b]
    return grouped.view(torch.int32).view(rows, k // word_rows, positions)
