"""Where a layer's packed tensors live: the one description every part asks.

Built once per module from the allocation (the bits of each expert), it says which experts share
a bit-width and their slot in that width's tensors, the name, shape and dtype of every stored
tensor, and the per-device index the kernels use to find an expert's slot. The module, the
quantizers, the kernels' host side, footprint, dequantize and the reload checks all read it:
nothing else builds a parameter name or works out which experts share a width.

Names: experts ``{projection}_b{bits}_{field}`` (e.g. ``gate_up_proj_b3_q2``),
one tensor per width holding its experts in expert order; a single packed linear
``{projection}_{field}`` (``weight_q2``), without the expert axis. Fields in ``FIELDS`` order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from .packed import PackedProjection, packed_tensor_shapes
from .packing import check_bits, check_packable, has_one_bit_plane
from .rtn import check_group_size

FIELDS = ("q2", "q1", "scale", "zero")  # also the order of a width's tensors at the kernel boundary
METADATA_FIELDS = ("scale", "zero")


class PackedLayout:
    """The stored tensors of ``projections`` ({name: (N out, K in)}) for experts of ``expert_bits``.

    ``stacked=False`` describes one weight (a linear): one width, no expert axis."""

    def __init__(
        self,
        expert_bits: Sequence[int],
        projections: Mapping[str, tuple[int, int]],
        group_size: int,
        *,
        stacked: bool = True,
        name: str = "experts",
        integer_zeros: bool = False,
    ):
        for b in expert_bits:
            check_bits(b)
        if not stacked and len(expert_bits) != 1:
            raise ValueError(f"an unstacked layout holds one weight, got {len(expert_bits)} bit-widths.")
        self.expert_bits = tuple(expert_bits)
        self.projections = dict(projections)
        self.group_size = group_size
        self.stacked = stacked
        self.integer_zeros = integer_zeros
        self.bit_widths = tuple(sorted(set(self.expert_bits)))
        self.members = {b: tuple(e for e, eb in enumerate(self.expert_bits) if eb == b) for b in self.bit_widths}
        for proj, (_, k) in self.projections.items():
            check_group_size(group_size, k, f"{name}.{proj}")
            check_packable(k, self.bit_widths, f"{name}.{proj}")
        self._specs = {
            self.name(proj, b, field): spec
            for proj, (n, k) in self.projections.items()
            for b in self.bit_widths
            for field, spec in packed_tensor_shapes(b, n, k, group_size, self._lead(b), integer_zeros).items()
        }
        self._fields_of = {
            self.name(proj, b, field): (proj, b, field)
            for proj in self.projections
            for b in self.bit_widths
            for field in self.fields(b)
        }
        # per projection, the names of kernel_planes' entries (formatted once: it runs every forward)
        self._plane_names = {proj: [self.name(proj, b, f) for b in self.bit_widths for f in FIELDS]
                             for proj in self.projections}  # fmt: skip
        self._local_indices: dict[tuple[int, torch.device], torch.Tensor] = {}

    @classmethod
    def single(
        cls, bits: int, out_features: int, in_features: int, group_size: int, name: str = "linear",
        integer_zeros: bool = False,
    ):  # fmt: skip
        """One ``[out, in]`` weight named ``weight``."""
        return cls((bits,), {"weight": (out_features, in_features)}, group_size, stacked=False, name=name,
                   integer_zeros=integer_zeros)  # fmt: skip

    @property
    def num_experts(self) -> int:
        return len(self.expert_bits)

    @property
    def num_weights(self) -> int:
        """Weights represented, over all experts and projections."""
        return self.num_experts * sum(n * k for n, k in self.projections.values())

    def _lead(self, bits: int) -> tuple[int, ...]:
        return (len(self.members[bits]),) if self.stacked else ()

    def slot(self, expert: int) -> tuple[int, int]:
        """(bit-width, index within that width's tensors) of ``expert``."""
        bits = self.expert_bits[expert]
        return bits, self.members[bits].index(expert)

    @staticmethod
    def fields(bits: int) -> tuple[str, ...]:
        """The fields stored at ``bits``: no two-bit planes at 1 bit, a one-bit plane at odd widths."""
        return tuple(f for f in FIELDS if (f != "q2" or bits >= 2) and (f != "q1" or has_one_bit_plane(bits)))

    def name(self, proj: str, bits: int, field: str) -> str:
        return f"{proj}_b{bits}_{field}" if self.stacked else f"{proj}_{field}"

    def specs(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Shape and dtype of every stored tensor, by parameter name."""
        return dict(self._specs)

    def field_of(self, name: str) -> tuple[str, int, str] | None:
        """(projection, bits, field) of a stored tensor's name, or None for any other name."""
        return self._fields_of.get(name)

    def is_metadata(self, name: str) -> bool:
        """Scales and zeros, as opposed to code planes."""
        return self._fields_of[name][2] in METADATA_FIELDS

    def named(self, proj: str, packed: PackedProjection) -> dict[str, torch.Tensor]:
        """``packed``'s tensors by the parameter names they are stored under."""
        return {self.name(proj, packed.bits, f): t for f, t in packed.tensors().items()}

    def packed(self, tensors: Mapping[str, torch.Tensor], proj: str, bits: int) -> PackedProjection:
        """All experts of ``bits`` bits for ``proj``, from tensors by name (a module's parameters)."""
        return PackedProjection(bits, **{f: tensors.get(self.name(proj, bits, f)) for f in FIELDS})

    def expert(self, tensors: Mapping[str, torch.Tensor], proj: str, expert: int) -> PackedProjection:
        """One expert's packed ``proj``."""
        bits, index = self.slot(expert)
        group = self.packed(tensors, proj, bits)
        if not self.stacked:
            return group
        return PackedProjection(bits, **{f: t[index] for f, t in group.tensors().items()})

    def kernel_planes(self, tensors: Mapping[str, torch.Tensor], proj: str) -> list[torch.Tensor | None]:
        """The layer flattened for the kernel boundary: each width's ``FIELDS`` in ``bit_widths``
        order (None where a field is absent), every tensor with its expert axis."""
        planes = [tensors.get(name) for name in self._plane_names[proj]]
        return planes if self.stacked else [None if t is None else t.unsqueeze(0) for t in planes]

    def local_index(self, bits: int, device: torch.device) -> torch.Tensor:
        """int32 [E + 1]: each expert's slot within the ``bits``-bit tensors, or -1 (the extra entry
        is the index transformers gives experts held elsewhere). Made once per width and device: a
        host-to-device copy in every forward would stall the stream and break CUDA-graph capture."""
        key = (bits, torch.device(device))
        if key not in self._local_indices:
            index = torch.full((self.num_experts + 1,), -1, dtype=torch.int32)
            index[list(self.members[bits])] = torch.arange(len(self.members[bits]), dtype=torch.int32)
            self._local_indices[key] = index.to(device)
        return self._local_indices[key]

    def local_indices(self, device: torch.device) -> list[torch.Tensor]:
        return [self.local_index(b, device) for b in self.bit_widths]

    def __repr__(self) -> str:
        counts = ", ".join(f"{len(self.members[b])}x{b}-bit" for b in self.bit_widths)
        zeros = ", integer_zeros=True" if self.integer_zeros else ""
        return f"PackedLayout({counts}, projections={self.projections}, group_size={self.group_size}{zeros})"
