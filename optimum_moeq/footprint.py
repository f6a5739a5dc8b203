"""True sizes of a quantized model's experts: packed codes plus group scales and zeros."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .nn import QUANTIZED_DENSE, MixedBitExperts


@dataclass(frozen=True)
class ExpertsFootprint:
    num_weights: int  # expert weights represented
    code_bytes: int  # packed bit planes
    metadata_bytes: int  # scales and zeros

    @property
    def total_bytes(self) -> int:
        return self.code_bytes + self.metadata_bytes

    @property
    def bits_per_weight(self) -> float:
        """Code bits only: the paper's "average bits"."""
        return 8 * self.code_bytes / self.num_weights

    @property
    def bits_per_weight_with_metadata(self) -> float:
        return 8 * self.total_bytes / self.num_weights

    def __str__(self) -> str:
        return (
            f"{self.num_weights:,} expert weights: {self.code_bytes:,} B of codes "
            f"({self.bits_per_weight:.3f} bits/weight) + {self.metadata_bytes:,} B of scales and zeros "
            f"= {self.total_bytes:,} B ({self.bits_per_weight_with_metadata:.3f} bits/weight)"
        )


def experts_footprint(model: nn.Module) -> ExpertsFootprint:
    """Sum the stored tensors of every mixed-bit experts module of ``model``."""
    num_weights = code_bytes = metadata_bytes = 0
    for module in model.modules():
        if not isinstance(module, MixedBitExperts):
            continue
        num_weights += module.layout.num_weights
        for name in module.layout.specs():
            param = getattr(module, name)
            nbytes = param.numel() * param.element_size()
            if module.layout.is_metadata(name):
                metadata_bytes += nbytes
            else:
                code_bytes += nbytes
    if not num_weights:
        raise ValueError("the model has no optimum-moeq mixed-bit experts: load it with RouterNormConfig first.")
    return ExpertsFootprint(num_weights, code_bytes, metadata_bytes)


@dataclass(frozen=True)
class ModelFootprint:
    """Every stored byte of a model: packed experts, packed linears and the rest as it is."""

    experts_bytes: int
    packed_linear_bytes: int  # attention and dense linears: ours (attention_bits) or bitsandbytes
    other_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.experts_bytes + self.packed_linear_bytes + self.other_bytes

    def __str__(self) -> str:
        gib = 2**30
        return (
            f"{self.total_bytes / gib:.3f} GiB in all: experts {self.experts_bytes / gib:.3f} GiB, "
            f"packed linears {self.packed_linear_bytes / gib:.3f} GiB, other {self.other_bytes / gib:.3f} GiB"
        )


def model_footprint(model: nn.Module) -> ModelFootprint:
    """True bytes of all parameters and buffers (tied tensors counted once), by kind."""
    kind_of = {}
    for module in model.modules():
        kind = (
            "experts"
            if isinstance(module, MixedBitExperts)
            else "linear"
            if isinstance(module, QUANTIZED_DENSE)
            else None
        )
        if kind:
            for tensor in module.parameters(recurse=False):
                kind_of[id(tensor)] = kind
    totals = {"experts": 0, "linear": 0, "other": 0}
    seen = set()
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        totals[kind_of.get(id(tensor), "other")] += tensor.numel() * tensor.element_size()
    return ModelFootprint(totals["experts"], totals["linear"], totals["other"])
