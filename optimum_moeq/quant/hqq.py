"""Calibration-free optimisation of each group's scale and zero ("hqq" method).

Three steps, each kept per group only where it lowers that group's squared error, so the
result is never worse than round-to-nearest:

1. clipping search: shrink the group's [min, max] range (extended to 0, as rtn's) by factors from 1 down to
   ``min_shrink`` and keep the factor with the least error (outliers cost less than the
   resolution they steal from every other weight);
2. least-squares refit: for the codes the current (scale, zero) give, the (scale, zero)
   minimising ``sum (s (q - z) - w)^2`` in closed form, alternated with re-rounding;
3. the half-quadratic solver of HQQ (Badri & Shaji, 2023) for the zero under a robust lp
   error (``lp_norm``, p < 1; None skips it).

The range search and the refit come first because HQQ's lp solver alone does little for 2-bit
weight error and can raise a model's output error, while the range search is where most of the
gain is; the lp step only replaces a group's zero where that lowers its squared error
(benchmarks/results/notes.md has the figures).
"""

from __future__ import annotations

import torch

from .packing import check_bits
from .rtn import _MIN_SCALE, METADATA_DTYPE, GroupQuantized, _grouped, codes_for


def _error(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    q = torch.round(w / scale + zero).clamp_(0, qmax)
    return ((q - zero) * scale - w).pow_(2).sum(dim=-1, keepdim=True), q


def _candidate(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmax: int, best: list[torch.Tensor]) -> None:
    """Keep (scale, zero), as float16 will store them, for the groups where it lowers the error."""
    scale = scale.to(METADATA_DTYPE).float().clamp_(min=_MIN_SCALE)
    zero = zero.to(METADATA_DTYPE).float()
    err = _error(w, scale, zero, qmax)[0]
    better = err < best[0]
    best[0] = torch.where(better, err, best[0])
    best[1] = torch.where(better, scale, best[1])
    best[2] = torch.where(better, zero, best[2])


def _shrink_lp(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """Generalised soft-thresholding: the proximal step of the lp norm used by HQQ."""
    return torch.sign(x) * torch.relu(x.abs() - (1.0 / beta) * x.abs().clamp_min(1e-8).pow(p - 1))


def quantize_hqq(
    weight: torch.Tensor,
    bits: int,
    group_size: int,
    *,
    shrink_steps: int = 10,
    min_shrink: float = 0.5,
    refit_iterations: int = 2,
    lp_norm: float | None = 0.7,
    lp_iterations: int = 5,
) -> GroupQuantized:
    """Optimised asymmetric group quantization of ``weight`` [..., N, K], on ``weight``'s device."""
    check_bits(bits)
    qmax = 2**bits - 1
    w = _grouped(weight.float(), group_size)
    wmin, wmax = w.amin(dim=-1, keepdim=True).clamp(max=0), w.amax(dim=-1, keepdim=True).clamp(min=0)  # as rtn
    best: list[torch.Tensor] = [torch.full_like(wmin, float("inf")), wmin, wmin]

    for shrink in torch.linspace(1.0, min_shrink, shrink_steps).tolist():
        lo, hi = wmin * shrink, wmax * shrink
        scale = ((hi - lo) / qmax).clamp_(min=_MIN_SCALE).to(METADATA_DTYPE).float()
        zero = -lo / scale  # against the stored scale, as rtn does: shrink 1.0 is exactly rtn
        _candidate(w, scale, zero, qmax, best)

    w_mean = w.mean(dim=-1, keepdim=True)
    for _ in range(refit_iterations):
        q = torch.round(w / best[1] + best[2]).clamp_(0, qmax)
        q_centered = q - q.mean(dim=-1, keepdim=True)
        variance = q_centered.pow(2).sum(dim=-1, keepdim=True)
        scale = torch.where(
            variance > 0, (q_centered * (w - w_mean)).sum(dim=-1, keepdim=True) / variance.clamp_min(1e-12), best[1]
        ).clamp_(min=_MIN_SCALE)
        zero = q.mean(dim=-1, keepdim=True) - w_mean / scale
        _candidate(w, scale, zero, qmax, best)

    if lp_norm is not None:
        scale, zero, beta = best[1], best[2].clone(), 10.0
        for _ in range(lp_iterations):
            q = torch.round(w / scale + zero).clamp_(0, qmax)
            outliers = _shrink_lp(w - (q - zero) * scale, beta, lp_norm)
            zero = torch.mean(q - (w - outliers) / scale, dim=-1, keepdim=True)
            beta *= 1.01
            _candidate(w, scale, zero, qmax, best)

    scale = best[1].squeeze(-1).to(METADATA_DTYPE)
    zero = best[2].squeeze(-1).to(METADATA_DTYPE)
    return GroupQuantized(codes_for(weight, scale, zero, bits), scale, zero, bits, group_size)
