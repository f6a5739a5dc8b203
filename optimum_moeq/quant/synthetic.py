"""Random packed experts, built directly in quantized form (benchmarks and GPU checks at real
sizes, where a full-precision copy would not fit or would not matter)."""

from __future__ import annotations

import torch

from .packed import PackedProjection, packed_tensor_shapes


def random_packed_projection(
    num_experts: int,
    n: int,
    k: int,
    bits: int,
    group_size: int,
    *,
    device: str | torch.device = "cpu",
    generator: torch.Generator | None = None,
    integer_zeros: bool = False,
) -> PackedProjection:
    """Uniformly random codes, scales ~ 0.01 and mid-range zeros: weights of a plausible magnitude
    (integer zeros: uniformly random codes too)."""
    tensors = {}
    shapes = packed_tensor_shapes(bits, n, k, group_size, (num_experts,), integer_zeros)
    for name, (shape, dtype) in shapes.items():
        if dtype == torch.int32:
            tensors[name] = torch.randint(-(2**31), 2**31 - 1, shape, dtype=dtype, generator=generator)
        elif name == "scale":
            tensors[name] = (torch.rand(shape, generator=generator) * 0.01 + 0.005).to(dtype)
        else:
            tensors[name] = ((2**bits - 1) / 2 + torch.randn(shape, generator=generator) * 0.25).to(dtype)
    return PackedProjection(bits=bits, **{name: t.to(device) for name, t in tensors.items()})
