"""``model.dequantize()``: the packed modules back to the model's own full-precision modules.

Each replacement keeps the module it stands in for, moved to the meta device (no memory, and
not a submodule: neither saved nor moved with the model). Dequantizing rebuilds that module on
the replacement's device and fills it with the dequantized weights, so the model becomes the
plain transformers model again (with the quantization error baked in).
"""

from __future__ import annotations

import torch
from torch import nn

from .kernels.reference import dequantize_packed
from .nn import MixedBitExperts

_ORIGINAL = "_moeq_original"


def remember_original(replacement: nn.Module, original: nn.Module) -> None:
    """Keep ``original`` (on the meta device, its storage freed) to rebuild it on dequantize."""
    replacement.__dict__[_ORIGINAL] = original.to("meta")


def dequantized_module(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """The full-precision module ``module`` replaced, holding ``module``'s dequantized weights."""
    original = module.__dict__.get(_ORIGINAL)
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
            _fill_experts(rebuilt, module)
        else:
            rebuilt.weight.copy_(module.dequantized())
            if module.bias is not None:
                rebuilt.bias.copy_(module.bias)
    return rebuilt.to(dtype).train(module.training)  # built before from_pretrained's eval(): in training mode


def _fill_experts(rebuilt: nn.Module, module: MixedBitExperts) -> None:
    weights = {
        proj: torch.stack([dequantize_packed(module.expert_projection(proj, e)) for e in range(module.num_experts)])
        for proj in module.projection_shapes
    }
    if all(isinstance(getattr(rebuilt, proj, None), torch.Tensor) for proj in weights):  # fused [E, N, K] experts
        for proj, weight in weights.items():
            getattr(rebuilt, proj).copy_(weight)
    elif not module.gated and all(f"expert_{e}" in rebuilt._modules for e in range(module.num_experts)):  # Switch
        for e in range(module.num_experts):
            rebuilt[f"expert_{e}"].wi.weight.copy_(weights["up_proj"][e])
            rebuilt[f"expert_{e}"].wo.weight.copy_(weights["down_proj"][e])
    else:
        raise NotImplementedError(f"dequantize() does not know the layout of {type(rebuilt).__name__}.")
