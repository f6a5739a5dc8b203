"""GPTQ (Frantar et al., 2023) for one weight, given its inputs' Hessian.

Columns (input features) are quantized in order; each column's rounding error is spread over
the columns not yet quantized, weighted by the inverse Hessian, so that the layer's output on
the calibration inputs moves as little as possible. Groups get their scale and zero when their
first column is reached, from the weights as updated so far. ``grid="auto"`` takes min-max
(rtn) at 2 bits and more, since hqq's clipping drops outlier weights that matter to the output,
and hqq's optimised grid at 1 bit, where min-max made GPTQ diverge (benchmarks/results/notes.md).
"""

from __future__ import annotations

import torch

from .hqq import quantize_hqq
from .packing import check_bits
from .rtn import METADATA_DTYPE, GroupQuantized, check_group_size, quantize_rtn


def input_hessian(inputs: torch.Tensor) -> torch.Tensor:
    """H = 2 X^T X / n (float64) of the rows of ``inputs`` [n, K] that reach the weight."""
    x = inputs.reshape(-1, inputs.shape[-1]).double()
    return 2.0 * x.T @ x / max(x.shape[0], 1)


def quantize_gptq(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    group_size: int,
    *,
    damp_percent: float = 0.01,
    block_size: int = 128,
    grid: str = "auto",
) -> GroupQuantized:
    """GPTQ codes, scales and zeros for ``weight`` [N, K] given ``hessian`` [K, K]."""
    check_bits(bits)
    n, k = weight.shape
    check_group_size(group_size, k)
    qmax = 2**bits - 1
    w = weight.double().clone()
    h = hessian.double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp_percent * torch.mean(torch.diag(h)) * torch.eye(k, dtype=h.dtype, device=h.device)
    h_inv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)

    codes = torch.zeros(n, k, dtype=torch.int32, device=weight.device)
    scales = torch.zeros(n, k // group_size, dtype=METADATA_DTYPE, device=weight.device)
    zeros = torch.zeros_like(scales)
    for start in range(0, k, block_size):
        end = min(start + block_size, k)
        block = w[:, start:end].clone()
        errors = torch.zeros_like(block)
        h_inv_block = h_inv[start:end, start:end]
        for i in range(end - start):
            column = start + i
            if column % group_size == 0:
                group_end = column + group_size
                group = torch.cat([block[:, i:], w[:, end:group_end]], dim=1)[:, :group_size]
                use_hqq = grid == "hqq" or (grid == "auto" and bits == 1)
                start_grid = (quantize_hqq if use_hqq else quantize_rtn)(group.float(), bits, group_size)
                scales[:, column // group_size] = start_grid.scale[:, 0]
                zeros[:, column // group_size] = start_grid.zero[:, 0]
                scale = start_grid.scale[:, 0].double()
                zero = start_grid.zero[:, 0].double()
            q = torch.round(block[:, i] / scale + zero).clamp_(0, qmax)
            codes[:, column] = q.to(torch.int32)
            error = (block[:, i] - (q - zero) * scale) / h_inv_block[i, i]
            block[:, i:] -= error[:, None] * h_inv_block[i, i:][None, :]
            errors[:, i] = error
        w[:, end:] -= errors @ h_inv[start:end, end:]
    return GroupQuantized(codes, scales, zeros, bits, group_size)
