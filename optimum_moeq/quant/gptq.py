"""GPTQ (Frantar et al., 2023) for one weight, given its inputs' Hessian.

Columns (input features) are quantized in order; each column's rounding error is spread over
the columns not yet quantized, weighted by the inverse Hessian, so that the layer's output on
the calibration inputs moves as little as possible. Groups get their scale and zero when their
first column is reached, from the weights as updated so far. The grid is min-max (rtn's) at every
width by default; ``grid="hqq"`` starts each group from HQQ's instead, which measured worse with
1-bit experts on the testbed (benchmarks/results/notes.md).
"""

from __future__ import annotations

import torch

from .hqq import check_hqq_zeros, quantize_hqq
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
    grid: str = "rtn",
    act_order: bool | str = False,
    overwrite_hessian: bool = False,
    integer_zero: bool = False,
) -> GroupQuantized:
    """GPTQ codes, scales and zeros for ``weight`` [N, K] given ``hessian`` [K, K], or for a batch
    of weights [E, N, K] with one Hessian each [E, K, K] (all experts of a width at once: batched
    Cholesky and updates, one pass over the columns).

    ``act_order``: quantize the columns in order of decreasing Hessian diagonal (the most active
    inputs first, while the most columns are left to absorb their error), each expert in its own
    order. The groups stay contiguous columns, with grids fitted before any update ("static
    groups"), so the packed format is the same either way. ``act_order="groups"``: the groups in
    order of their largest Hessian diagonal, each group's columns by decreasing diagonal, and each
    group's grid fitted when its first column is reached, on the weights as updated so far (the
    group-aware reordering of Gafni et al., 2025, GPTQModel's default).

    ``overwrite_hessian``: the factorization may reuse ``hessian``'s memory (float64, contiguous),
    which the caller must not read afterwards; saves a K x K copy per expert.

    ``integer_zero``: each group's zero point is rounded to a code, as GPTQ's own format stores it."""
    check_bits(bits)
    if weight.dim() == 2:
        q = quantize_gptq(weight[None], hessian[None], bits, group_size, damp_percent=damp_percent,
                          block_size=block_size, grid=grid, act_order=act_order,
                          overwrite_hessian=overwrite_hessian, integer_zero=integer_zero)  # fmt: skip
        return GroupQuantized(q.codes[0], q.scale[0], q.zero[0], bits, group_size)
    e, n, k = weight.shape
    if tuple(hessian.shape) != (e, k, k):
        raise ValueError(f"hessian has shape {tuple(hessian.shape)}, expected {(e, k, k)} for weights {(e, n, k)}.")
    check_group_size(group_size, k)
    if grid not in ("rtn", "hqq"):
        raise ValueError(f"grid={grid!r} is not supported: allowed are 'rtn' and 'hqq'.")
    if grid == "hqq":
        check_hqq_zeros(integer_zero)

    def fit(weights):
        return quantize_hqq(weights, bits, group_size) if grid == "hqq" else quantize_rtn(
            weights, bits, group_size, integer_zero)  # fmt: skip

    if act_order not in (False, True, "groups"):
        raise ValueError(f"act_order={act_order!r} is not supported: allowed are False, True and 'groups'.")
    if act_order is True:
        return _act_order_gptq(weight, hessian, bits, group_size, damp_percent, block_size, fit, overwrite_hessian)
    order = _group_aware_order(hessian, group_size) if act_order == "groups" else None
    w, h_inv = _prepared(weight, hessian, damp_percent, order, overwrite_hessian=overwrite_hessian)
    scales = torch.zeros(e, n, k // group_size, dtype=METADATA_DTYPE, device=weight.device)
    zeros = torch.zeros_like(scales)
    experts = torch.arange(e, device=weight.device)
    grid = {}

    def grid_at(column, block, i, end, w):
        if column % group_size == 0:  # the group's grid, from the weights as updated so far
            group = torch.cat([block[..., i:], w[..., end : column + group_size]], dim=-1)[..., :group_size]
            start_grid = fit(group.float())
            stored = column // group_size if order is None else order[:, column] // group_size  # [E]
            scales[experts, :, stored] = start_grid.scale[..., 0]
            zeros[experts, :, stored] = start_grid.zero[..., 0]
            grid["scale"], grid["zero"] = start_grid.scale[..., 0].double(), start_grid.zero[..., 0].double()
        return grid["scale"], grid["zero"]

    codes = _solve_columns(w, h_inv, bits, block_size, grid_at)
    del w  # the float64 working copy, before the codes' int32 copy
    if order is not None:  # rows back in column order
        codes = torch.empty_like(codes).scatter_(1, order[:, :, None].expand(e, k, n), codes)
    return GroupQuantized(_int32_codes(codes), scales, zeros, bits, group_size)


def _group_aware_order(hessian: torch.Tensor, group_size: int) -> torch.Tensor:
    """[E, K]: each expert's groups by decreasing largest Hessian diagonal, and within a group its
    columns by decreasing diagonal (a group's columns stay together)."""
    diag = torch.diagonal(hessian, dim1=-2, dim2=-1).reshape(hessian.shape[0], -1, group_size)
    within = torch.argsort(diag, dim=-1, descending=True, stable=True)  # [E, K/G, G]
    groups = torch.argsort(diag.amax(dim=-1), dim=-1, descending=True, stable=True)  # [E, K/G]
    columns = within + torch.arange(0, hessian.shape[-1], group_size, device=hessian.device)[:, None]
    return columns.gather(1, groups[:, :, None].expand_as(columns)).reshape(hessian.shape[0], -1)


def _solve_columns(w, h_inv, bits, block_size, grid_at) -> torch.Tensor:
    """GPTQ's column loop over ``w`` [E, N, K] (updated in place) with the upper Cholesky factor
    of its inverse Hessian: each column is rounded on the grid ``grid_at(column, block, i, end, w)``
    gives (scale, zero [E, N]), and its error spread over the columns after it, lazily by blocks.

    A block is held transposed, [E, B, N], so that a column is a contiguous row: the loop's
    per-column rounding and rank-1 update then read whole cache lines (a column of [E, N, B]
    touches one line per output). Codes come back uint8 [E, K, N] (a fourth of int32's memory: a
    Mixtral gate_up expert's are 117 M)."""
    e, n, k = w.shape
    codes = torch.zeros(e, k, n, dtype=torch.uint8, device=w.device)
    for start in range(0, k, block_size):
        end = min(start + block_size, k)
        block = w[..., start:end].transpose(-1, -2).contiguous()
        errors = torch.zeros_like(block)
        h_inv_block = h_inv[:, start:end, start:end]
        for i in range(end - start):
            scale, zero = grid_at(start + i, block.transpose(-1, -2), i, end, w)
            q = torch.round(block[:, i] / scale + zero).clamp_(0, 2**bits - 1)
            codes[:, start + i] = q.to(torch.uint8)
            error = (block[:, i] - (q - zero) * scale) / h_inv_block[:, i, i, None]
            block[:, i:].baddbmm_(h_inv_block[:, i, i:, None], error[:, None, :], alpha=-1)  # one pass
            errors[:, i] = error
        # in place: `w[..., end:] -= errors^T @ h_inv` made an [E, N, K - end] temporary (896 MB for
        # a Mixtral gate_up expert at the first block)
        w[..., end:].baddbmm_(errors.transpose(-1, -2), h_inv[:, start:end, end:], alpha=-1)
    return codes


def _int32_codes(codes_kn: torch.Tensor) -> torch.Tensor:
    """[E, N, K] int32 codes (every quantizer's convention) from the column loop's uint8 [E, K, N]."""
    return codes_kn.transpose(-1, -2).to(torch.int32, memory_format=torch.contiguous_format)


def _act_order_gptq(weight, hessian, bits, group_size, damp_percent, block_size, fit,
                    overwrite_hessian) -> GroupQuantized:  # fmt: skip
    """GPTQ over each expert's columns permuted by decreasing Hessian diagonal, with every group's
    grid fitted up front on the (dead-input-zeroed) weights; codes are put back in column order."""
    e, n, k = weight.shape
    order = torch.argsort(torch.diagonal(hessian, dim1=-2, dim2=-1), dim=-1, descending=True, stable=True)
    # the grids, fitted before the float64 working copy exists; of the fit only scales and zeros are kept
    dead = torch.diagonal(hessian, dim1=-2, dim2=-1) == 0
    fitted = fit(weight.float().masked_fill(dead[:, None, :], 0.0))
    scale, zero = fitted.scale, fitted.zero
    del fitted, dead
    w, h_inv = _prepared(weight, hessian, damp_percent, order, overwrite_hessian)
    group_of = order // group_size  # [E, K]: each permuted column's group
    scale_rows = scale.double().transpose(-1, -2).contiguous()  # [E, K / G, N]
    zero_rows = zero.double().transpose(-1, -2).contiguous()
    experts = torch.arange(e, device=weight.device)

    def static_grid(column, *_):
        return scale_rows[experts, group_of[:, column]], zero_rows[experts, group_of[:, column]]

    permuted = _solve_columns(w, h_inv, bits, block_size, static_grid)  # [E, K, N], rows in solve order
    del w
    codes = torch.empty_like(permuted).scatter_(1, order[:, :, None].expand(e, k, n), permuted)
    del permuted
    return GroupQuantized(_int32_codes(codes), scale, zero, bits, group_size)


def _prepared(weight: torch.Tensor, hessian: torch.Tensor, damp_percent: float, order: torch.Tensor | None = None,
              overwrite_hessian: bool = False):  # fmt: skip
    """float64 weights with dead inputs (never active: zero Hessian diagonal) zeroed, and the upper
    Cholesky factor of the damped inverse Hessian, per batch entry; with ``order`` [E, K], columns
    (and the Hessian's rows and columns) permuted to it first.

    Memory: no K x K temporary (a Mixtral down projection's Hessian is 1.6 GB). The factors are
    computed in the Hessian's own buffer (``overwrite_hessian``: the caller's, which it gives up;
    else one copy), viewed column-major so that LAPACK works in it in place (torch clones a
    row-major input); the permutation and the damping work in place too."""
    e, n, k = weight.shape
    if overwrite_hessian and hessian.dtype == torch.float64 and hessian.is_contiguous():
        h = hessian
    else:
        h = hessian.to(torch.float64, memory_format=torch.contiguous_format, copy=True)
    if order is None:
        w = weight.to(torch.float64, copy=True)  # one copy (.double().clone() made two of a float32 weight)
    else:
        w = weight.gather(-1, order[:, None, :].expand(e, n, k)).to(torch.float64)
        _permute_in_place(h, order)
    _symmetrize_from_lower(h)
    h = h.mT  # column-major; the same matrix, now that it is exactly symmetric
    diag = torch.diagonal(h, dim1=-2, dim2=-1)  # a view: the updates below write into h
    dead = diag == 0
    w.masked_fill_(dead[:, None, :], 0.0)
    diag += dead  # a dead input's row and column are zero: a 1 on the diagonal
    diag += damp_percent * diag.mean(dim=-1, keepdim=True)
    del diag
    torch.linalg.cholesky(h, out=h)
    torch.cholesky_inverse(h, out=h)
    torch.linalg.cholesky(h, upper=True, out=h)
    return w, h


def _chunk_rows(k: int) -> int:
    """Rows per chunk of the in-place passes over a K x K float64 matrix: their temporaries, 64 MB."""
    return max(1, 2**23 // k)


def _permute_in_place(h: torch.Tensor, order: torch.Tensor) -> None:
    """h[e] <- h[e][order[e]][:, order[e]] for a row-major [E, K, K] ``h``, by row chunks: columns
    permuted within each chunk of rows, then, through the transposed view, within each chunk of columns."""
    e, k, _ = h.shape
    step = _chunk_rows(k)
    for view in (h, h.mT):
        for start in range(0, k, step):
            rows = view[:, start : start + step]
            rows.copy_(rows.gather(-1, order[:, None, :].expand(rows.shape)))


def _symmetrize_from_lower(h: torch.Tensor) -> None:
    """Copy each row-major [E, K, K] matrix's lower triangle over its upper one, by blocks (a float64
    Hessian summed by BLAS is symmetric only to rounding; LAPACK read its lower triangle before)."""
    k = h.shape[-1]
    step = _chunk_rows(k)
    for start in range(0, k, step):
        end = min(start + step, k)
        block = h[:, start:end, start:end]
        block.copy_(block.tril() + block.tril(-1).mT)
        h[:, start:end, end:] = h[:, end:, start:end].mT
