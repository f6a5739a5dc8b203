"""Where a MoE family keeps its routers and experts, on disk and in the loaded model."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn
from transformers.quantizers.quantizers_utils import should_convert_module


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
    # every routing linear, by the end of its name: they stay full precision whatever the options
    routing_modules: tuple[str, ...] = ("gate",)
    decoder_layers: str = "model.layers"  # the decoder layers' ModuleList (GPTQ walks it)
    # where the checkpoint keeps a loaded module's tensors: (model name part, checkpoint name part),
    # and each expert's gate, up and down weights (``experts.{e}.{name}.weight``), which the
    # loaded model fuses; streaming GPTQ reads a layer with them
    checkpoint_aliases: tuple[tuple[str, str], ...] = ()
    expert_tensor_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    gated: bool = True  # act(gate) * up, with gate_up fused; else act(up)
    extra_weight_conversions: Callable[[], list] | None = None  # fuse per-expert tensors while loading
    replacement: str = "top_k"  # which MixedBitExperts subclass keeps the replaced module's forward contract
    # dense linears that attention_bits / attention_method leave alone, by last name: their parent's
    # forward reads their `.weight` (Switch's dense FFN casts its input to `wo.weight.dtype`)
    dense_linears_kept: tuple[str, ...] = ()
    # writes dequantized weights {projection: [E, N, K]} into the module the experts replaced
    fill_dequantized: Callable[[nn.Module, Mapping[str, torch.Tensor]], None] | None = None

    def experts_module_name(self, match: re.Match) -> str:
        return self.experts_module.format(prefix=match["prefix"])

    def checkpoint_names(self, name: str) -> list[str]:
        """Where model tensor ``name`` may sit in a checkpoint: as named, or under the family's aliases
        (transformers saves some families under their original checkpoint names)."""
        return [name] + [name.replace(model_part, disk_part) for model_part, disk_part in self.checkpoint_aliases]

    def input_rows(self, rows: int) -> int:
        """Rows of a fused input projection that the method reads: the gate rows, which come first."""
        return rows // 2 if self.gated else rows

    def is_routing(self, name: str) -> bool:
        return any(name == r or name.endswith("." + r) for r in self.routing_modules)

    def inside_experts(self, name: str) -> bool:
        """Whether module ``name`` lies within an experts module."""
        parents = [name[:i] for i in range(len(name)) if name[i] == "."]
        return any(self.experts_module_key.match(parent) for parent in parents)

    def experts_shapes(self, model: nn.Module, modules_to_not_convert) -> dict[str, ExpertsShape]:
        """The shape of every experts module to quantize, or an error saying why there is none."""
        shapes = {
            name: self.experts_shape(module, model.config)
            for name, module in model.named_modules()
            if self.experts_module_key.match(name) and should_convert_module(name, modules_to_not_convert)
        }
        if shapes:
            return shapes
        names = [name for name, _ in model.named_modules()]
        if any(self.experts_module_key.match(f"{model.base_model_prefix}.{name}") for name in names):
            raise ValueError(
                f"{type(model).__name__} is the base model without its head, whose module names differ from "
                "the checkpoint's: load the full model (AutoModelForCausalLM) and use its .model."
            )
        if not any(self.experts_module_key.match(name) for name in names):
            raise ValueError(
                f"this {model.config.model_type} model has no MoE layer (its config makes every layer dense): "
                "nothing to quantize."
            )
        raise ValueError(
            f"modules_to_not_convert={modules_to_not_convert!r} excludes every experts module: "
            "nothing is left to quantize."
        )

    def fill_original(self, module: nn.Module, weights: Mapping[str, torch.Tensor]) -> None:
        """Write dequantized ``weights`` into ``module``, the experts module as the family builds it."""
        if self.fill_dequantized is not None:
            self.fill_dequantized(module, weights)
            return
        if not all(isinstance(getattr(module, proj, None), torch.Tensor) for proj in weights):
            raise NotImplementedError(f"dequantize() does not know the layout of {type(module).__name__}.")
        for proj, weight in weights.items():  # fused [E, N, K] experts
            getattr(module, proj).copy_(weight)


def fused_experts_shape(module: nn.Module, config) -> ExpertsShape:
    """transformers 5 experts with ``gate_up_proj`` [E, 2I, H] and ``down_proj`` [E, H, I]."""
    num_experts, two_i, hidden = module.gate_up_proj.shape
    return ExpertsShape(num_experts, hidden, two_i // 2, config.get_text_config().hidden_act)
