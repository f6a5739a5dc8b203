"""Mixtral: router ``block_sparse_moe.gate`` [E, H]; experts w1 (gate), w3 (up), w2 (down).

Checkpoints hold per-expert tensors under ``block_sparse_moe`` (transformers 5 saves them so
too); the loaded model fuses them into ``mlp.experts.gate_up_proj`` [E, 2I, H].
"""

import re

from .adapter import MoEAdapter, fused_experts_shape

_PREFIX = r"^(?P<prefix>model\.layers\.\d+)\.(?:block_sparse_moe|mlp)"

MIXTRAL = MoEAdapter(
    name="mixtral",
    model_types=("mixtral",),
    router_key=re.compile(_PREFIX + r"\.gate\.weight$"),
    expert_input_key=re.compile(_PREFIX + r"\.experts\.(?P<expert>\d+)\.w1\.weight$"),
    fused_input_key=re.compile(_PREFIX + r"\.experts\.gate_up_proj$"),
    experts_module_key=re.compile(r"^model\.layers\.\d+\.mlp\.experts$"),
    experts_shape=fused_experts_shape,
    checkpoint_aliases=((".mlp.", ".block_sparse_moe."),),
    expert_tensor_names=("w1", "w3", "w2"),
)
