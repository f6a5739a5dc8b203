"""Orders of experts, most precision first: router ranking and the MaxVar re-rank."""

from __future__ import annotations

from collections.abc import Sequence

RANKINGS = ("combined", "router", "maxvar", "measured")


def rank_by_router(router_change: Sequence[float]) -> list[int]:
    """Ascending router-norm change: the expert whose router row moved least comes first."""
    return sorted(range(len(router_change)), key=lambda e: router_change[e])


def rank_by_maxvar(maxvar: Sequence[float]) -> list[int]:
    """Descending MaxVar: the expert with the largest neuron variance comes first."""
    return sorted(range(len(maxvar)), key=lambda e: -maxvar[e])


def combined_rerank(router_order: Sequence[int], maxvar: Sequence[float], zeta: float) -> list[int]:
    """Move high-variance experts ahead of much-lower-variance ones in the router order.

    Walking the router order from its end, expert j moves to the first position p whose expert
    i has ``zeta * v_i < v_j``, if p is ahead of j.
    """
    order = list(router_order)
    for j in reversed(router_order):
        target = next((p for p, i in enumerate(order) if zeta * maxvar[i] < maxvar[j]), None)
        if target is not None and target < order.index(j):
            order.remove(j)
            order.insert(target, j)
    return order


def rank_experts(ranking: str, router_change: Sequence[float], maxvar: Sequence[float], zeta: float) -> list[int]:
    if ranking == "router":
        return rank_by_router(router_change)
    if ranking == "maxvar":
        return rank_by_maxvar(maxvar)
    if ranking in ("combined", "measured"):  # measured: the scan's order until GPTQ measures (allocation/measured.py)
        return combined_rerank(rank_by_router(router_change), maxvar, zeta)
    raise ValueError(f"ranking={ranking!r} is not supported: allowed are {RANKINGS}.")
