"""A linear layer stored group-quantized in the packed format (``attention_bits``)."""

from __future__ import annotations

import torch
from torch import nn

from ..kernels.cpu_moe import LinearCall, linear_forward
from ..kernels.grouped import blocks_for_prefill, mixed_bit_projection
from ..kernels.reference import dequantize_packed, packed_linear
from ..quant import PackedProjection
from ..quant.layout import PackedLayout
from .stored import PackedModule


class PackedLinear(PackedModule):
    """``nn.Linear`` with its weight as ``weight_q2``/``weight_q1`` bit planes and float16
    ``weight_scale``/``weight_zero`` (``PackedLayout.single``: the experts' layout for one weight)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int,
        bias: bool = False,
        method: str = "rtn",
        with_full_precision_placeholders: bool = False,
        name: str = "linear",
        integer_zeros: bool = False,
    ):
        super().__init__()
        self.layout = PackedLayout.single(
            bits, out_features, in_features, group_size, name=name, integer_zeros=integer_zeros
        )
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.method = bits, method
        self.projection_shapes = {"weight": (out_features, in_features)}
        self._declare_storage(with_full_precision_placeholders)
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def packed(self, proj: str = "weight", bits: int | None = None) -> PackedProjection:
        return super().packed(proj, self.bits if bits is None else bits)

    def _make_cpu_call(self) -> LinearCall:
        return LinearCall(self.layout, self._parameters)

    def dequantized(self) -> torch.Tensor:
        """The weight [out, in] in float32."""
        return dequantize_packed(self.packed())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        call = self._prepared_cpu_call(x)
        if call is not None:
            out = call(x)
        elif self._use_triton(x):
            out = triton_linear_forward(x, self.layout, self._parameters)
        elif self._use_cpu_kernels(x):
            out = linear_forward(x, self.layout, self._parameters)
        else:
            out = packed_linear(x, self.packed())
        return out + self.bias.to(out.dtype) if self.bias is not None else out

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, bias={self.bias is not None}"
        )


def triton_linear_forward(x: torch.Tensor, layout: PackedLayout, tensors) -> torch.Tensor:
    """A packed linear ([..., in] -> [..., out] in ``x``'s dtype) by the Triton kernels: one
    "expert" that every row is routed to."""
    n_out, k = layout.projections["weight"]
    rows = x.reshape(-1, k).contiguous()
    pair_expert = torch.zeros(rows.shape[0], dtype=torch.int32, device=x.device)
    out = mixed_bit_projection(
        rows, pair_expert, layout, layout.kernel_planes(tensors, "weight"), n_out=n_out, out_dtype=torch.float32,
        x_rows_per_pair_div=1, blocks=blocks_for_prefill(pair_expert, num_experts=1),
    )  # fmt: skip
    return out.to(x.dtype).reshape(*x.shape[:-1], n_out)
