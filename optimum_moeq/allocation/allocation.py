"""The bit-width of every expert, with the signals that chose it."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from ..quant.packing import check_bits
from .bits import assign_bits
from .ranking import rank_experts

_MAX_COLUMNS = 32  # wider layers print counts per level instead of one column per expert

logger = logging.getLogger(__name__)


@dataclass
class LayerSignals:
    """What the method reads for one MoE layer: router-norm change and MaxVar per expert."""

    router_change: list[float]
    maxvar: list[float]

    def __post_init__(self) -> None:
        if len(self.router_change) != len(self.maxvar):
            raise ValueError(
                f"{len(self.router_change)} router rows but {len(self.maxvar)} expert projections in one layer."
            )


@dataclass
class Allocation:
    """Bits per expert, keyed by the experts module name as ``model.named_modules()`` gives it."""

    bits: dict[str, list[int]]
    signals: dict[str, LayerSignals] = field(default_factory=dict)
    orders: dict[str, list[int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        validate_bits_mapping(self.bits)

    @property
    def average_bits(self) -> float:
        """Mean bits per expert over all layers (experts of a layer have equal size)."""
        all_bits = [b for layer in self.bits.values() for b in layer]
        return sum(all_bits) / len(all_bits)

    def to_dict(self) -> dict:
        return {
            "bits": self.bits,
            "signals": {k: {"router_change": s.router_change, "maxvar": s.maxvar} for k, s in self.signals.items()},
            "orders": self.orders,
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> Allocation:
        return cls(
            bits={k: list(v) for k, v in data["bits"].items()},
            signals={k: LayerSignals(**v) for k, v in data.get("signals", {}).items()},
            orders={k: list(v) for k, v in data.get("orders", {}).items()},
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> Allocation:
        return cls.from_dict(json.loads(text))

    def __str__(self) -> str:
        return format_table(self.bits)


def validate_bits_mapping(bits: Mapping[str, Sequence[int]]) -> None:
    """Every entry a non-empty list of integer bit-widths in 1..8."""
    if not isinstance(bits, Mapping) or not bits:
        raise ValueError(f"allocation={bits!r} must map each experts module name to its list of bits.")
    for name, layer in bits.items():
        if not isinstance(layer, Sequence) or isinstance(layer, str) or not layer:
            raise ValueError(f"allocation[{name!r}]={layer!r} must be a non-empty list of bits, one per expert.")
        for expert, b in enumerate(layer):
            try:
                check_bits(b)
            except ValueError as err:
                raise ValueError(f"allocation[{name!r}][{expert}]: {err}") from None


def format_table(bits: Mapping[str, Sequence[int]]) -> str:
    names = list(bits)
    width = max(len(n) for n in names)
    num_experts = max(len(v) for v in bits.values())
    levels = sorted({b for layer in bits.values() for b in layer}, reverse=True)
    if num_experts <= _MAX_COLUMNS:
        header = " ".join(f"{e:>2}" for e in range(num_experts))
        rows = [" ".join(f"{b:>2}" for b in bits[n]) for n in names]
    else:
        header = " ".join(f"{f'{b}-bit':>6}" for b in levels)
        rows = [" ".join(f"{list(bits[n]).count(b):>6}" for b in levels) for n in names]
    lines = [f"{'experts module':<{width}} | {header} |  avg"]
    lines.append("-" * len(lines[0]))
    for name, row in zip(names, rows):
        lines.append(f"{name:<{width}} | {row} | {sum(bits[name]) / len(bits[name]):4.2f}")
    all_bits = [b for layer in bits.values() for b in layer]
    counts = ", ".join(f"{all_bits.count(b)} at {b} bits" for b in levels)
    lines.append(f"average bits per expert weight: {sum(all_bits) / len(all_bits):.4f} ({counts})")
    return "\n".join(lines)


def allocate_layers(
    signals: Mapping[str, LayerSignals],
    avg_bits: float,
    bit_levels: Sequence[int],
    ranking: str = "combined",
    zeta: float = 3.0,
) -> Allocation:
    """Rank each layer's experts and give them bits averaging ``avg_bits``."""
    orders = {name: rank_experts(ranking, layer.router_change, layer.maxvar, zeta) for name, layer in signals.items()}
    bits = {name: assign_bits(order, avg_bits, bit_levels) for name, order in orders.items()}
    over = {name: sum(b) / len(b) for name, b in bits.items() if sum(b) / len(b) > avg_bits + 1e-9}
    if over:  # whole experts per level: the count is rounded to the nearest, as the method specifies
        name, achieved = next(iter(over.items()))
        logger.warning(
            "avg_bits=%s is not reachable with %d experts per layer at levels %s: %d layers get more "
            "(e.g. %s: %.4f bits). Lower avg_bits to stay within a memory budget.",
            avg_bits, len(bits[name]), list(bit_levels), len(over), name, achieved,
        )  # fmt: skip
    return Allocation(bits=bits, signals=dict(signals), orders=orders)
