"""Where a MoE family keeps its routers and experts, on disk and in the loaded model."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class ExpertsShape:
    num_experts: int
    hidden_dim: int
    intermediate_dim: int
    activation: str


@dataclass(frozen=True)
class MoEAdapter:
    """Names and layouts of one MoE family.

    Checkpoint patterns capture ``prefix`` (the MoE layer's checkpoint path, e.g.
    ``model.layers.3``) and, for per-expert tensors, ``expert``; the loaded model's experts
    module is ``experts_module.format(prefix=...)``.
    """

    name: str
    model_types: tuple[str, ...]
    router_key: re.Pattern  # router weight [E, H]
    expert_input_key: re.Pattern  # one expert's input (gate, or up when ungated) projection [I, H]
    fused_input_key: re.Pattern | None  # all experts' input projection [E, (2)I, H]; gate rows first
    experts_module_key: re.Pattern  # names of the experts modules in the loaded model
    experts_shape: Callable[[nn.Module, object], ExpertsShape]
    experts_module: str = "{prefix}.mlp.experts"
    router_module: str = "gate"  # the router's module, beside the experts module
    gated: bool = True  # act(gate) * up, with gate_up fused; else act(up)
    extra_weight_conversions: Callable[[], list] | None = None  # fuse per-expert tensors while loading
    replacement: str = "top_k"  # which MixedBitExperts subclass keeps the replaced module's forward contract
    # dense linears that attention_bits / attention_method leave alone, by last name: their parent's
    # forward reads their `.weight` (Switch's dense FFN casts its input to `wo.weight.dtype`)
    dense_linears_kept: tuple[str, ...] = ()

    def experts_module_name(self, match: re.Match) -> str:
        return self.experts_module.format(prefix=match["prefix"])


def fused_experts_shape(module: nn.Module, config) -> ExpertsShape:
    """transformers 5 experts with ``gate_up_proj`` [E, 2I, H] and ``down_proj`` [E, H, I]."""
    num_experts, two_i, hidden = module.gate_up_proj.shape
    return ExpertsShape(num_experts, hidden, two_i // 2, config.get_text_config().hidden_act)
