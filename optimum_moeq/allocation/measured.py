"""``ranking="measured"``: the high bit-width where it lowers the output error the most.

With calibration data at hand (GPTQ), each expert's weights can be tried at the layer's lowest and
highest level on the very inputs it receives. An expert's gain is how much its output error
(sum over its calibration tokens of ||(W_q - W) x||^2, the Hessian-weighted weight error, for its
input and down projections) falls from the lowest to the highest level; experts with the largest
gain come first in the order, and ``assign_bits`` gives the levels as for any other ranking.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..quant.rtn import dequantize, quantize_rtn


def output_error(weight: torch.Tensor, inputs: torch.Tensor, token_weights: torch.Tensor, bits: int, group_size: int):
    """sum_t w_t ||(W_q - W) x_t||^2 for ``weight`` [N, K] round-to-nearest at ``bits``."""
    q = quantize_rtn(weight.float(), bits, group_size)
    delta = dequantize(q.codes, q.scale, q.zero) - weight.float()
    return float((token_weights.float() * (inputs.float() @ delta.T).pow(2).sum(dim=-1)).sum())


def expert_gain(
    projections: Sequence[tuple[torch.Tensor, torch.Tensor]],
    token_weights: torch.Tensor,
    levels: Sequence[int],
    group_size: int,
) -> float:
    """Output error at the lowest level minus at the highest, summed over ``projections`` (each a
    (weight [N, K], its inputs [T, K]) pair, rows of the same T tokens)."""
    low, high = min(levels), max(levels)
    return sum(
        output_error(w, x, token_weights, low, group_size) - output_error(w, x, token_weights, high, group_size)
        for w, x in projections
    )


def rank_by_gain(gains: Sequence[float]) -> list[int]:
    """Descending gain: the expert whose error falls most with more bits comes first."""
    return sorted(range(len(gains)), key=lambda e: -gains[e])
