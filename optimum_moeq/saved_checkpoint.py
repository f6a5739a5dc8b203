"""A pre-quantized checkpoint checked against the model built for it.

transformers reports a missing or mis-shaped tensor and loads on: for packed experts that means
uninitialised codes and NaN outputs, so the load is refused after it. The packed shapes also only
say how many experts have each width, not which, so each shard records the allocation it was
saved with (safetensors metadata), and a config.json whose allocation differs from it (edited, or
left by a failed re-save) is refused before any weight loads.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable

from safetensors import safe_open
from torch import nn

ALLOCATION_METADATA_KEY = "moeq_allocation"


def allocation_metadata(allocation: dict[str, list[int]]) -> dict[str, str]:
    """safetensors metadata recording the allocation the shards hold."""
    return {ALLOCATION_METADATA_KEY: json.dumps(allocation, sort_keys=True)}


def check_saved_allocation(checkpoint_files: Iterable[str], allocation: dict[str, list[int]]) -> None:
    """Before any weight loads: the allocation the shards were saved with (when recorded) must be
    the one in config.json."""
    for path in checkpoint_files:
        if not str(path).endswith(".safetensors"):
            continue
        with safe_open(path, framework="pt") as f:
            saved = (f.metadata() or {}).get(ALLOCATION_METADATA_KEY)
        if saved is not None and json.loads(saved) != allocation:
            raise ValueError(
                "config.json's allocation does not match the one the packed weights were saved with "
                "(config.json edited, or left by a failed save over this folder): re-quantize, or restore "
                "the config.json saved with these weights."
            )


def check_all_loaded(
    model: nn.Module, quantized_types: tuple[type, ...], also: Callable[[str], bool] = lambda name: False
) -> None:
    """After loading: every stored tensor of the quantized modules (and of the modules ``also``
    names) came from the checkpoint (transformers flags what it loads; a missing or mis-shaped
    tensor stays uninitialised). Tensors a device map offloaded to disk or CPU sit on the meta
    device and are not checked."""
    missing = [
        f"{module_name}.{param_name}"
        for module_name, module in model.named_modules()
        if isinstance(module, quantized_types) or also(module_name)
        for param_name, param in module.named_parameters(recurse=False)
        if param_name != "bias" and not param.is_meta and not getattr(param, "_is_hf_initialized", False)
    ]
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise ValueError(
            f"the checkpoint lacks weights its config.json describes, or holds them with other shapes "
            f"({shown}): it is incomplete or was saved with another allocation or group size; re-quantize the "
            "original model."
        )
