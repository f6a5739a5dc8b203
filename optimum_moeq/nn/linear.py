"""A linear layer stored group-quantized in the packed format (``attention_bits``)."""

from __future__ import annotations

import torch
from torch import nn

from ..kernels.grouped import block_k_for, blocks_for_prefill, mixed_bit_projection, triton_available
from ..kernels.reference import dequantize_packed, packed_linear
from ..quant import PackedProjection, check_group_size, pack_projection, packed_tensor_shapes, quantize_weight
from ..quant.packing import check_packable
from .stored import QuantizedModule

_FIELDS = ("q2", "q1", "scale", "zero")


class PackedLinear(QuantizedModule):
    """``nn.Linear`` with its weight as ``weight_q2``/``weight_q1`` bit planes and float16
    ``weight_scale``/``weight_zero`` (the layout of ``quant/packed.py`` with one expert)."""

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
    ):
        super().__init__()
        check_group_size(group_size, in_features, name)
        check_packable(in_features, [bits], name)
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.method = bits, group_size, method
        self.projection_shapes = {"weight": (out_features, in_features)}
        for field, (shape, dtype) in packed_tensor_shapes(bits, out_features, in_features, group_size).items():
            self.register_parameter(
                f"weight_{field}", nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)
            )
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        if with_full_precision_placeholders:
            self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)

    def packed(self) -> PackedProjection:
        return PackedProjection(self.bits, **{f: getattr(self, f"weight_{f}", None) for f in _FIELDS})

    def dequantized(self) -> torch.Tensor:
        """The weight [out, in] in float32."""
        return dequantize_packed(self.packed())

    def quantize_projection(self, proj: str, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        quantized = quantize_weight(weight, self.bits, self.group_size, self.method)
        return {f"weight_{field}": t for field, t in pack_projection(quantized).tensors().items()}

    def drop_placeholder(self, proj: str) -> None:
        self._parameters.pop(proj, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and triton_available() and block_k_for(self.group_size) is not None:
            out = self._triton_forward(x.reshape(-1, self.in_features)).reshape(*x.shape[:-1], self.out_features)
        else:
            out = packed_linear(x, self.packed())
        return out + self.bias.to(out.dtype) if self.bias is not None else out

    def _triton_forward(self, x: torch.Tensor) -> torch.Tensor:
        # One "expert" that every row is routed to.
        pair_expert = torch.zeros(x.shape[0], dtype=torch.int32, device=x.device)
        packed = PackedProjection(self.bits, **{f: t.unsqueeze(0) for f, t in self.packed().tensors().items()})
        blocks = blocks_for_prefill(pair_expert, num_experts=1)
        out = mixed_bit_projection(
            x.contiguous(), pair_expert, {self.bits: packed}, [self.bits], group_size=self.group_size,
            n_out=self.out_features, out_dtype=torch.float32, x_rows_per_pair_div=1, blocks=blocks,
        )  # fmt: skip
        return out.to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, bias={self.bias is not None}"
        )
