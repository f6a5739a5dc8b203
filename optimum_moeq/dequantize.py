"""``model.dequantize()``: the packed modules back to the model's own full-precision modules.

Each replacement keeps the module it stands in for, moved to the meta device (no memory, and
not a submodule: neither saved nor moved with the model; see ``nn.swap_module``). Dequantizing
rebuilds that module on the replacement's device and fills it with the dequantized weights, so the
model becomes the plain transformers model again (with the quantization error baked in).
"""

from __future__ import annotations

import torch
from torch import nn

from .kernels.reference import dequantize_packed
from .nn import MixedBitExperts, original_module


def dequantized_module(module: nn.Module, dtype: torch.dtype, adapter) -> nn.Module:
    """The full-precision module ``module`` replaced, holding ``module``'s dequantized weights
    (``adapter``, the model family's, knows how its experts modules hold them)."""
    original = original_module(module)
    if original is None:
        raise ValueError(f"{type(module).__name__} does not know the module it replaced: it cannot be dequantized.")
    params = list(module.parameters())
    if any(p.is_meta for p in params):
        raise ValueError(
            "the model has quantized weights offloaded to CPU or disk: load it on devices that hold all of it "
            "(device_map without 'disk'/'cpu' offload) before dequantize()."
        )
    rebuilt = original.to_empty(device=params[0].device)
    with torch.no_grad():
        if isinstance(module, MixedBitExperts):
            adapter.fill_original(rebuilt, _expert_weights(module))
        else:
            rebuilt.weight.copy_(module.dequantized())
            if module.bias is not None:
                rebuilt.bias.copy_(module.bias)
    return rebuilt.to(dtype).train(module.training)  # built before from_pretrained's eval(): in training mode


def _expert_weights(module: MixedBitExperts) -> dict[str, torch.Tensor]:
    return {
        proj: torch.stack([dequantize_packed(module.expert_projection(proj, e)) for e in range(module.num_experts)])
        for proj in module.layout.projections
    }
