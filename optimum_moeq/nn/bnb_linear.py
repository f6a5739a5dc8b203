"""Dense linears quantized by bitsandbytes (``attention_method="bnb_nf4" | "bnb_int8"``).

bitsandbytes does the quantizing and dequantizing (``quantize_4bit``/``dequantize_4bit`` with
NF4 blocks of 64, ``int8_vectorwise_quant``/``_dequant``); the module only names the stored tensors
as its own parameters (``weight_nf4``, ``weight_absmax``, ``weight_quant_map``; or ``weight_int8``,
``weight_row_scale``), so they stream in, save and reload through the same path as the
experts, with no bitsandbytes-specific loading hooks.
"""

from __future__ import annotations

import torch
from torch import nn

from .stored import QuantizedModule

NF4_BLOCK = 64


def _bnb_functional():
    try:
        import bitsandbytes.functional as functional
    except ImportError:
        raise ImportError("attention_method='bnb_*' needs bitsandbytes: pip install bitsandbytes") from None
    return functional


class _BnbLinear(QuantizedModule):
    def __init__(self, in_features: int, out_features: int, bias: bool, with_full_precision_placeholders: bool):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.projection_shapes = {"weight": (out_features, in_features)}
        self._declare_storage(with_full_precision_placeholders)
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def quantize_projection(self, proj: str, weight: torch.Tensor, quantize=None) -> dict[str, torch.Tensor]:
        if quantize is not None:
            raise ValueError(f"{type(self).__name__} is quantized by bitsandbytes; it takes no quantize function.")
        return self._quantize(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(
            x, self.dequantized().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype)
        )

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class BnbNF4Linear(_BnbLinear):
    """4-bit NormalFloat weights, blocks of 64 with a float32 absmax each."""

    def __init__(self, in_features, out_features, bias=False, with_full_precision_placeholders=False, **_):
        super().__init__(in_features, out_features, bias, with_full_precision_placeholders)

    def stored_specs(self):
        numel = self.in_features * self.out_features
        return {
            "weight_nf4": ((numel // 2, 1), torch.uint8),
            "weight_absmax": ((-(-numel // NF4_BLOCK),), torch.float32),
            "weight_quant_map": ((16,), torch.float32),
        }

    def _quantize(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        packed, state = _bnb_functional().quantize_4bit(weight.float(), blocksize=NF4_BLOCK, quant_type="nf4")
        return {"weight_nf4": packed, "weight_absmax": state.absmax, "weight_quant_map": state.code}

    def dequantized(self) -> torch.Tensor:
        return dequantize_nf4(
            self.weight_nf4, self.weight_absmax, self.weight_quant_map, self.projection_shapes["weight"]
        )


class BnbInt8Linear(_BnbLinear):
    """LLM.int8()-style weights: int8 per output row with a float32 absmax scale."""

    def __init__(self, in_features, out_features, bias=False, with_full_precision_placeholders=False, **_):
        super().__init__(in_features, out_features, bias, with_full_precision_placeholders)

    def stored_specs(self):
        return {
            "weight_int8": ((self.out_features, self.in_features), torch.int8),
            "weight_row_scale": ((self.out_features,), torch.float32),
        }

    def _quantize(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        codes, row_scale, _ = _bnb_functional().int8_vectorwise_quant(weight.to(torch.float16))
        return {"weight_int8": codes, "weight_row_scale": row_scale}

    def dequantized(self) -> torch.Tensor:
        return dequantize_int8(self.weight_int8, self.weight_row_scale)


def dequantize_nf4(nf4: torch.Tensor, absmax: torch.Tensor, quant_map: torch.Tensor, shape) -> torch.Tensor:
    """The float32 weight of ``shape`` from NF4 codes (two per byte, row-major, any shape) and one
    absmax per block of 64 of the flattened weight."""
    functional = _bnb_functional()
    state = functional.QuantState(
        absmax=absmax.reshape(-1), shape=torch.Size(shape), code=quant_map, blocksize=NF4_BLOCK, quant_type="nf4",
        dtype=torch.float32,
    )  # fmt: skip
    return functional.dequantize_4bit(nf4.reshape(-1, 1), state)


def dequantize_int8(codes: torch.Tensor, row_scale: torch.Tensor) -> torch.Tensor:
    """The float32 weight from int8 codes [N, K] and each row's absmax scale [N]."""
    return _bnb_functional().int8_vectorwise_dequant(codes, row_scale).float()
