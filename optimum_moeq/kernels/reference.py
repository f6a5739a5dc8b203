"""Torch reference path: unpack, dequantize, matmul. The CPU path and the oracle for kernels."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from ..quant.layout import PackedLayout
from ..quant.packed import PackedProjection
from ..quant.packing import unpack_codes, unpack_zero_codes


def group_zeros(packed: PackedProjection) -> torch.Tensor:
    """The zero points ``[..., K/G, N]`` in float32, float16-stored (format 1) or integer codes."""
    if packed.zero.dtype.is_floating_point:
        return packed.zero.float()
    return unpack_zero_codes(packed.zero, packed.bits, packed.scale.shape[-1]).float()


def dequantize_packed(packed: PackedProjection) -> torch.Tensor:
    """Full weight ``[..., N, K]`` in float32 from the kernel layout."""
    codes = unpack_codes(packed.q2, packed.q1, packed.bits).float()  # [..., K, N]
    group_size = codes.shape[-2] // packed.scale.shape[-2]
    scale = packed.scale.float().repeat_interleave(group_size, dim=-2)
    zero = group_zeros(packed).repeat_interleave(group_size, dim=-2)
    return ((codes - zero) * scale).transpose(-1, -2)


def packed_linear(x: torch.Tensor, packed: PackedProjection) -> torch.Tensor:
    """``x @ W.T`` for one expert's packed weight, returned in ``x``'s dtype. Computed in float32
    from the exact weights: a bf16 copy of the weight would round each one by up to 2^-9, an error
    the packed format does not have and the kernels do not make."""
    return torch.nn.functional.linear(x.float(), dequantize_packed(packed)).to(x.dtype)


def experts_reference(
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    layout: PackedLayout,
    tensors: Mapping[str, torch.Tensor],
    *,
    input_projection: str,
    act_fn: Callable[[torch.Tensor], torch.Tensor],
    gated: bool,
) -> torch.Tensor:
    """An experts layer [T, H] in ``hidden_states``' dtype, expert by expert through the dequantized
    weights. In float32, as the kernels, except the down projection's input, which is rounded to
    the model's dtype as transformers' dense experts and every kernel here round it (a bf16 model
    computes its intermediate in bf16). Pairs routed outside [0, E) (experts held elsewhere,
    dropped tokens) contribute nothing."""
    x = hidden_states.float()
    out = torch.zeros(hidden_states.shape, dtype=torch.float32, device=hidden_states.device)
    for expert in torch.unique(top_k_index).tolist():
        if not 0 <= expert < layout.num_experts:
            continue
        token_idx, k_pos = torch.where(top_k_index == expert)
        h = packed_linear(x[token_idx], layout.expert(tensors, input_projection, expert))
        if gated:
            gate, up = h.chunk(2, dim=-1)
            h = act_fn(gate) * up
        else:
            h = act_fn(h)
        h = h.to(hidden_states.dtype).float()
        y = packed_linear(h, layout.expert(tensors, "down_proj", expert))
        out.index_add_(0, token_idx, y * top_k_weights[token_idx, k_pos, None].float())
    return out.to(hidden_states.dtype)
