"""The packed tensors of one projection for a set of experts sharing a bit-width.

Kernel layout, for ``E_b`` experts of ``bits`` bits, a projection with
K inputs and N outputs and groups of G along K:

    q2    int32    [E_b, bits // 2, K / 16, N]   two-bit planes (absent for 1 bit)
    q1    int32    [E_b, K / 32, N]              top bit for odd widths (absent otherwise)
    scale float16  [E_b, K / G, N]
    zero  float16  [E_b, K / G, N]               W[n, k] = (code - zero) * scale
      or  int32    [E_b, K / G, Z]               integer zeros as b-bit codes (``zero_words``)

Format version 1 stores float16 zeros only. Version 2 adds integer zeros, packed like the codes
(along N, see packing.py): at 2 bits and g128 the metadata costs 18 bits a group instead of 32,
2.14 bits per weight in all (GPTQ's own format). Version 2 reads version 1: the zero's dtype says
which it is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .packing import pack_codes, pack_zero_codes, packed_shapes, zero_words
from .rtn import METADATA_DTYPE, GroupQuantized

FORMAT_VERSION = 2  # what this version writes when zeros are integers (float zeros: version 1)
READABLE_FORMAT_VERSIONS = (1, 2)


@dataclass
class PackedProjection:
    bits: int
    scale: torch.Tensor
    zero: torch.Tensor
    q2: torch.Tensor | None = None
    q1: torch.Tensor | None = None

    def tensors(self) -> dict[str, torch.Tensor]:
        """The stored tensors by suffix (``q2``, ``q1``, ``scale``, ``zero``)."""
        named = {"q2": self.q2, "q1": self.q1, "scale": self.scale, "zero": self.zero}
        return {name: t for name, t in named.items() if t is not None}

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())


def pack_projection(quantized: GroupQuantized, integer_zeros: bool = False) -> PackedProjection:
    """Move group-quantized ``[..., N, K]`` codes and metadata into the kernel layout; with
    ``integer_zeros`` the zeros (then integers in the code range) are packed as codes."""
    q2, q1 = pack_codes(quantized.codes.transpose(-1, -2), quantized.bits)
    zero = quantized.zero.transpose(-1, -2)
    if integer_zeros:
        limit = 2**quantized.bits - 1
        if not torch.equal(zero, zero.round()) or zero.min() < 0 or zero.max() > limit:
            raise ValueError(
                f"integer_zeros: the quantizer gave zero points that are not integers in [0, {limit}] "
                f"(e.g. {zero.flatten()[torch.argmax((zero != zero.round()).flatten().int())].item()}); "
                "quantize with integer_zero=True."
            )
        zero = pack_zero_codes(zero, quantized.bits)
    return PackedProjection(
        bits=quantized.bits, scale=quantized.scale.transpose(-1, -2).contiguous(), zero=zero.contiguous(), q2=q2, q1=q1
    )


def concat_packed(parts: list[PackedProjection]) -> PackedProjection:
    """Packed projections of the same width, experts one after another (the expert axis, 0)."""
    if len(parts) == 1:
        return parts[0]
    fields = {name: torch.cat([p.tensors()[name] for p in parts]) for name in parts[0].tensors()}
    return PackedProjection(bits=parts[0].bits, **fields)


def packed_tensor_shapes(
    bits: int, n: int, k: int, group_size: int, lead: tuple[int, ...] = (), integer_zeros: bool = False
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Shape and dtype of each stored tensor, to build empty modules before weights load."""
    specs = {name: (shape, torch.int32) for name, shape in packed_shapes(bits, k, n, lead).items()}
    specs["scale"] = ((*lead, k // group_size, n), METADATA_DTYPE)
    if integer_zeros:
        specs["zero"] = ((*lead, k // group_size, zero_words(bits, n)), torch.int32)
    else:
        specs["zero"] = ((*lead, k // group_size, n), METADATA_DTYPE)
    return specs
