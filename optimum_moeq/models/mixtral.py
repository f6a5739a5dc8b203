"""Mixtral: router ``block_sparse_moe.gate`` [E, H]; experts w1 (gate), w3 (up), w2 (down).

Checkpoints hold per-expert tensors under ``block_sparse_moe`` (transformers 5 saves them so
too); the loaded model fuses them into ``mlp.experts.gate_up_proj`` [E, 2I, H].
"""

import re

from .adapter import MoEAdapter

_LAYER = r"^model\.layers\.(?P<layer>\d+)\.(?:block_sparse_moe|mlp)"

MIXTRAL = MoEAdapter(
    model_types=("mixtral",),
    router_key=re.compile(_LAYER + r"\.gate\.weight$"),
    expert_input_key=re.compile(_LAYER + r"\.experts\.(?P<expert>\d+)\.w1\.weight$"),
    fused_input_key=re.compile(_LAYER + r"\.experts\.gate_up_proj$"),
    experts_module="model.layers.{layer}.mlp.experts",
    experts_module_key=re.compile(r"^model\.layers\.\d+\.mlp\.experts$"),
)
