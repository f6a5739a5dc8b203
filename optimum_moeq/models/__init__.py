"""One adapter per MoE family; ``get_adapter`` picks it from a transformers config."""

from __future__ import annotations

from .adapter import ExpertsShape, MoEAdapter
from .mixtral import MIXTRAL
from .qwen_style import QWEN_STYLE
from .switch_transformers import SWITCH_TRANSFORMERS

ADAPTERS: tuple[MoEAdapter, ...] = (MIXTRAL, QWEN_STYLE, SWITCH_TRANSFORMERS)
SUPPORTED_MODEL_TYPES = tuple(t for a in ADAPTERS for t in a.model_types)

_EXPERT_COUNT_ATTRIBUTES = ("num_local_experts", "num_experts", "n_routed_experts")


def get_adapter(config) -> MoEAdapter:
    """The adapter for ``config.model_type``, or an error saying what is supported."""
    model_type = getattr(config, "model_type", None)
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    configs = (text_config, getattr(text_config, "ffn_config", None))  # DBRX keeps its experts in ffn_config
    if not any(getattr(c, a, None) for c in configs for a in (*_EXPERT_COUNT_ATTRIBUTES, "moe_num_experts")):
        raise ValueError(
            f"model_type={model_type!r} is not a Mixture-of-Experts model: there are no experts to allocate bits to."
        )
    raise ValueError(
        f"model_type={model_type!r} is a MoE architecture optimum-moeq does not support yet; "
        f"supported are {SUPPORTED_MODEL_TYPES}."
    )


__all__ = ["ADAPTERS", "SUPPORTED_MODEL_TYPES", "ExpertsShape", "MoEAdapter", "get_adapter"]
