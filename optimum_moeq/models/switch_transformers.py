"""Switch Transformers (encoder-decoder): router ``mlp.router.classifier`` [E, H]; experts
``mlp.experts.expert_{e}`` with ``wi`` [F, H] -> act -> ``wo`` [H, F], no gate.

The per-expert ``wi``/``wo`` are merged into [E, F, H] / [E, H, F] while loading, so they
quantize through the same path as the fused families; the experts module takes a one-hot
expert mask (tokens over capacity have none) instead of top-k indices.
"""

import re

from transformers.core_model_loading import MergeModulelist, WeightConverter

from .adapter import ExpertsShape, MoEAdapter

_PREFIX = r"^(?P<prefix>(?:encoder|decoder)\.block\.\d+\.layer\.\d+)\.mlp"


def _switch_experts_shape(module, config) -> ExpertsShape:
    expert = module["expert_0"]
    return ExpertsShape(len(module), expert.wi.in_features, expert.wi.out_features, config.dense_act_fn)


def _merge_experts():
    return [
        WeightConverter([".experts.expert_*.wi.weight"], ".experts.up_proj", operations=[MergeModulelist(dim=0)]),
        WeightConverter([".experts.expert_*.wo.weight"], ".experts.down_proj", operations=[MergeModulelist(dim=0)]),
    ]


def _fill_switch_experts(module, weights) -> None:
    for e in range(len(module)):
        module[f"expert_{e}"].wi.weight.copy_(weights["up_proj"][e])
        module[f"expert_{e}"].wo.weight.copy_(weights["down_proj"][e])


SWITCH_TRANSFORMERS = MoEAdapter(
    name="switch_transformers",
    model_types=("switch_transformers",),
    router_key=re.compile(_PREFIX + r"\.router\.classifier\.weight$"),
    expert_input_key=re.compile(_PREFIX + r"\.experts\.expert_(?P<expert>\d+)\.wi\.weight$"),
    fused_input_key=None,
    experts_module_key=re.compile(r"^(?:encoder|decoder)\.block\.\d+\.layer\.\d+\.mlp\.experts$"),
    experts_shape=_switch_experts_shape,
    gated=False,
    extra_weight_conversions=_merge_experts,
    replacement="one_hot",
    router_module="router.classifier",
    routing_modules=("router.classifier",),
    decoder_layers="",  # encoder-decoder: GPTQ does not walk it
    dense_linears_kept=("wo",),
    fill_dequantized=_fill_switch_experts,
)
