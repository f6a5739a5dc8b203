"""Half-Quadratic Quantization (HQQ; Badri & Shaji, 2023) of each group's zero point ("hqq" method).

As the authors' library (``hqq``, ``Quantizer.quantize(..., optimize=True)``) does it: the grid
starts at the group's min-max range (not extended to 0, unlike rtn's), its scale is kept, and the
zero point is refined by the half-quadratic proximal solver for a robust lp error (p = 0.7):
alternately split off the residual's outliers by generalised soft-thresholding, then set the zero
to the mean that fits the rest. The iterations stop, for each weight, at the first one whose mean
absolute error over the whole weight does not fall, keeping that iteration's zero update as the
library does. Every expert of a stacked ``[E, N, K]`` tensor is its own weight.

The codes are the library's too: rounded on the solver's float32 grid (``w * inverse + zero``),
before scales and zeros are stored in float16 (the inverse scale inverted). Re-rounding against the
stored grid instead moves about 1e-4 of the codes and measured 0.011 perplexity worse on the testbed
(benchmarks/peers.py, g128 2-bit). A group whose zero would leave float16's range (near-constant
groups far from 0) takes rtn's grid and codes instead.
"""

from __future__ import annotations

import torch

from .packing import check_bits
from .rtn import METADATA_DTYPE, GroupQuantized, _grouped, quantize_rtn

# The library's guards: a range this narrow gets a unit scale, and the inverse scale is capped so
# that half-precision metadata stays finite.
_NARROW_RANGE = 1e-4
_MAX_INVERSE_SCALE = 2e4


def _shrink_lp(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """Generalised soft-thresholding: the proximal step of the lp norm (p < 1) with penalty beta."""
    magnitude = x.abs()
    return torch.sign(x) * (magnitude - magnitude.pow(p - 1) / beta).clamp_min_(0.0)


def check_hqq_zeros(integer_zero: bool) -> None:
    if integer_zero:
        raise ValueError(
            "method='hqq' optimises each zero point as a real number (as the hqq library does below 4 bits), "
            "so it stores float16 zeros: use integer_zeros=False (or None, the default) with it."
        )


def quantize_hqq(
    weight: torch.Tensor,
    bits: int,
    group_size: int,
    *,
    lp_norm: float = 0.7,
    beta: float = 10.0,
    iterations: int = 20,
) -> GroupQuantized:
    """HQQ-optimised asymmetric group quantization of ``weight`` [N, K] or [E, N, K] (one weight per
    expert), on ``weight``'s device; the library's defaults (lp 0.7, beta 10, 20 iterations)."""
    check_bits(bits)
    qmax = 2**bits - 1
    w = _grouped(weight.float(), group_size)  # [..., N, K/G, G]
    wmin, wmax = w.amin(dim=-1, keepdim=True), w.amax(dim=-1, keepdim=True)
    span = wmax - wmin
    inverse = torch.where(span.abs() <= _NARROW_RANGE, 1.0, qmax / span.clamp_min(_NARROW_RANGE))
    inverse = inverse.clamp_(max=_MAX_INVERSE_SCALE)
    zero = -wmin * inverse

    per_weight = weight.shape[:-2]  # one early stop per expert
    best = torch.full(per_weight, float("inf"), device=weight.device)
    running = torch.ones(per_weight, dtype=torch.bool, device=weight.device)
    for _ in range(iterations):
        q = torch.round(w * inverse + zero).clamp_(0, qmax)
        residual = w - (q - zero) / inverse
        error = residual.abs().mean(dim=(-3, -2, -1))
        refined = torch.mean(q - (w - _shrink_lp(residual, beta, lp_norm)) * inverse, dim=-1, keepdim=True)
        zero = torch.where(running[..., None, None, None], refined, zero)
        improved = error < best
        best = torch.where(running & improved, error, best)
        running &= improved
        if not running.any():
            break

    codes = torch.round(w * inverse + zero).clamp_(0, qmax).to(torch.int32)
    scale = (1.0 / inverse).squeeze(-1).to(METADATA_DTYPE)
    zero = zero.squeeze(-1).to(METADATA_DTYPE)
    unstorable = ~torch.isfinite(zero)
    if unstorable.any():
        fallback = quantize_rtn(weight, bits, group_size)
        scale = torch.where(unstorable, fallback.scale, scale)
        zero = torch.where(unstorable, fallback.zero, zero)
        codes = torch.where(unstorable[..., None], _grouped(fallback.codes, group_size), codes)
    return GroupQuantized(codes.reshape(weight.shape), scale, zero, bits, group_size)
