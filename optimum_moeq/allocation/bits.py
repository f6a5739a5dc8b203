"""How many experts get each bit level, and which."""

from __future__ import annotations

from collections.abc import Sequence

from ..quant.packing import check_bits


def check_levels(bit_levels: Sequence[int]) -> tuple[int, ...]:
    """Validate 2 or 3 ascending levels in 1..8, equally spaced when there are 3."""
    levels = tuple(bit_levels)
    if len(levels) not in (2, 3):
        raise ValueError(f"bit_levels={levels} must have 2 or 3 levels, e.g. (2, 3) or (1, 2, 3).")
    for b in levels:
        check_bits(b)
    if any(lo >= hi for lo, hi in zip(levels, levels[1:])):
        raise ValueError(f"bit_levels={levels} must be strictly ascending, e.g. (2, 3).")
    if len(levels) == 3 and levels[1] - levels[0] != levels[2] - levels[1]:
        raise ValueError(f"bit_levels={levels}: three levels must be equally spaced, e.g. (1, 2, 3) or (2, 4, 6).")
    return levels


def check_avg_bits(avg_bits: float, bit_levels: Sequence[int]) -> None:
    lo, hi = bit_levels[0], bit_levels[-1]
    if not lo <= avg_bits <= hi:
        raise ValueError(
            f"avg_bits={avg_bits} is outside the bit levels {tuple(bit_levels)}: "
            f"choose avg_bits between {lo} and {hi}."
        )


def level_counts(num_experts: int, avg_bits: float, bit_levels: Sequence[int]) -> list[int]:
    """Experts per level, highest level first, e.g. [n_hi, n_lo] or [n_hi, n_mid, n_lo]."""
    levels = check_levels(bit_levels)
    check_avg_bits(avg_bits, levels)
    if len(levels) == 2:
        lo, hi = levels
        n_hi = round((avg_bits - lo) / (hi - lo) * num_experts)
        return [n_hi, num_experts - n_hi]
    return list(_three_level_counts(num_experts, avg_bits, levels))


def _three_level_counts(num_experts: int, avg_bits: float, levels: tuple[int, ...]) -> tuple[int, int, int]:
    lo, mid, hi = levels
    step = mid - lo
    if avg_bits >= mid:
        n_hi = round((avg_bits - mid) / step * num_experts)
        n_mid, n_lo = num_experts - n_hi, 0
    else:
        n_mid = round((avg_bits - lo) / step * num_experts)
        n_hi, n_lo = 0, num_experts - n_mid
    start_hi = n_hi
    upper_third = avg_bits > hi - 2 * step / 3
    lower_third = avg_bits < lo + 2 * step / 3
    # Trading two middle experts for one high and one low keeps the sum of bits.
    while n_mid >= 2 and not lower_third:
        if not upper_third and n_mid - 2 < (n_hi + 1) - start_hi:
            break
        n_hi, n_mid, n_lo = n_hi + 1, n_mid - 2, n_lo + 1
    return n_hi, n_mid, n_lo


def assign_bits(order: Sequence[int], avg_bits: float, bit_levels: Sequence[int]) -> list[int]:
    """Bits per expert (expert-index order): the first of ``order`` get the highest level."""
    counts = level_counts(len(order), avg_bits, bit_levels)
    levels_high_first = sorted(bit_levels, reverse=True)
    bits = [0] * len(order)
    rank = 0
    for level, count in zip(levels_high_first, counts):
        for expert in order[rank : rank + count]:
            bits[expert] = level
        rank += count
    return bits
