"""Families laid out like Qwen2-MoE: router ``mlp.gate`` [E, H]; experts ``gate_proj``,
``up_proj``, ``down_proj`` per expert on disk, fused ``gate_up_proj`` once loaded.

Shared experts (Qwen2-MoE ``shared_expert``, DeepSeek ``shared_experts``) and dense layers
(DeepSeek's first layers, Qwen2-MoE ``mlp_only_layers``) are not routed experts and stay as
they are.
"""

import re

from .adapter import MoEAdapter, fused_experts_shape

_PREFIX = r"^(?P<prefix>model\.layers\.\d+)\.mlp"

QWEN_STYLE = MoEAdapter(
    name="qwen2_moe-style",
    model_types=("qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3"),
    router_key=re.compile(_PREFIX + r"\.gate\.weight$"),
    expert_input_key=re.compile(_PREFIX + r"\.experts\.(?P<expert>\d+)\.gate_proj\.weight$"),
    fused_input_key=re.compile(_PREFIX + r"\.experts\.gate_up_proj$"),
    experts_module_key=re.compile(r"^model\.layers\.\d+\.mlp\.experts$"),
    experts_shape=fused_experts_shape,
    routing_modules=("gate", "shared_expert_gate"),  # Qwen2-MoE scales its shared expert by a 1-row linear
)
