"""Where a MoE family keeps its routers and experts, on disk and in the loaded model."""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class MoEAdapter:
    """Names and layouts of one MoE family.

    Checkpoint patterns name a ``layer`` group (and ``expert`` for per-expert tensors); the
    loaded model's experts module of layer L is ``experts_module.format(layer=L)``.
    """

    model_types: tuple[str, ...]
    router_key: re.Pattern
    expert_input_key: re.Pattern  # one expert's input (gate) projection [I, H]
    fused_input_key: re.Pattern  # all experts' fused gate_up [E, 2I, H]; gate rows first
    experts_module: str
    experts_module_key: re.Pattern  # matches the loaded model's experts module names

    def experts_module_name(self, layer: int | str) -> str:
        return self.experts_module.format(layer=int(layer))
