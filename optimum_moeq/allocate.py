"""``allocate``: the bits of every expert, from the checkpoint files alone, without building the model."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Collection

from transformers import AutoConfig
from transformers.quantizers.quantizers_utils import should_convert_module
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

from .allocation import Allocation, LayerSignals, allocate_layers, read_layer_signals, safetensors_files
from .allocation.checkpoint import read_router_norms, router_shapes
from .config import RouterNormConfig
from .models import MoEAdapter, get_adapter

logger = logging.getLogger(__name__)


def allocate(path_or_repo: str | os.PathLike, config: RouterNormConfig, *, progress: bool = True) -> Allocation:
    """Read routers and expert input projections from ``path_or_repo`` (a local folder or a Hub id)
    and allocate bits as ``config`` asks. Only those tensors are read, one at a time."""
    check_location(path_or_repo)
    if config.reference_model is not None:
        check_location(config.reference_model, "reference_model")
    model_config = AutoConfig.from_pretrained(path_or_repo)
    adapter = get_adapter(model_config)
    return allocate_from_files(resolve_checkpoint(path_or_repo, adapter), adapter, config, progress=progress)


def allocate_from_files(
    files: list[str],
    adapter: MoEAdapter,
    config: RouterNormConfig,
    *,
    experts_modules: Collection[str] | None = None,
    progress: bool = True,
) -> Allocation:
    """The allocation for the experts modules found in ``files`` (restricted to ``experts_modules``
    when given, and to those ``config.modules_to_not_convert`` does not exclude)."""
    reference_files = None
    if config.reference_model is not None:  # resolved first: a bad reference fails before the scan
        check_location(config.reference_model, "reference_model")
        check_same_family(config.reference_model, adapter)
        reference_files = resolve_checkpoint(config.reference_model, adapter, routers_only=True)
    signals = {
        name: layer
        for name, layer in read_layer_signals(files, adapter, progress=progress).items()
        if should_convert_module(name, config.modules_to_not_convert)
        and (experts_modules is None or name in experts_modules)
    }
    if reference_files is not None:
        check_same_routers(router_shapes(files, adapter), router_shapes(reference_files, adapter))
        signals = subtract_reference(signals, read_router_norms(reference_files, adapter, progress=progress))
    return allocate_layers(signals, config.avg_bits, config.bit_levels, config.ranking, config.zeta)


def check_location(path_or_repo: str | os.PathLike, what: str = "model") -> None:
    """A local folder that exists, or something shaped like a Hub id: fail before anything is read."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    text = os.fspath(path_or_repo)
    if os.path.isdir(text):
        return
    if os.path.exists(text):
        raise NotADirectoryError(f"{what} {text!r} is a file: give the checkpoint's folder or a Hub id.")
    try:
        validate_repo_id(text)
    except HFValidationError:
        raise FileNotFoundError(f"{what} {text!r}: no such local folder, and not a Hub id (org/name).") from None


def check_same_family(reference_model: str, adapter: MoEAdapter) -> None:
    """reference_model is a checkpoint of the model's own family (its config.json says so)."""
    reference = AutoConfig.from_pretrained(reference_model)
    if reference.model_type not in adapter.model_types:
        raise ValueError(
            f"reference_model {reference_model!r} is a {reference.model_type!r} checkpoint, the model a "
            f"{'/'.join(adapter.model_types)!r} one: give the model's own checkpoint before fine-tuning."
        )


def check_same_routers(model: dict[str, tuple[int, ...]], reference: dict[str, tuple[int, ...]]) -> None:
    """Every router of the model has a reference router of the same [experts, hidden] shape."""
    for name, shape in model.items():
        if name in reference and reference[name] != shape:
            raise ValueError(
                f"reference_model's router for {name} is {list(reference[name])}, the model's {list(shape)}: "
                "reference_model must be the same architecture (experts and hidden size) before fine-tuning."
            )


def subtract_reference(signals: dict[str, LayerSignals], reference: dict[str, list[float]]) -> dict[str, LayerSignals]:
    """Router-norm change: final row norms minus the reference checkpoint's, layer by layer."""
    changed = {}
    for name, layer in signals.items():
        if name not in reference:
            raise ValueError(f"the reference model has no router for {name}: is it the same architecture?")
        if len(reference[name]) != len(layer.router_change):
            raise ValueError(
                f"{name}: the reference router has {len(reference[name])} experts, "
                f"the model's has {len(layer.router_change)}."
            )
        change = [final - ref for final, ref in zip(layer.router_change, reference[name])]
        changed[name] = LayerSignals(change, layer.maxvar)
    unchanged = [name for name, layer in changed.items() if not any(layer.router_change)]
    if unchanged:
        logger.warning(
            "reference_model has the same routers as the model in %d of %d layers (e.g. %s): there is no "
            "router-norm change to rank by there. Is reference_model the model itself?",
            len(unchanged), len(changed), unchanged[0],
        )  # fmt: skip
    return changed


def resolve_checkpoint(
    path_or_repo: str | os.PathLike, adapter: MoEAdapter, *, routers_only: bool = False
) -> list[str]:
    """Local safetensors files of a folder, or the Hub files holding the tensors the method reads
    (for ``routers_only``, just the shards with router weights)."""
    if os.path.isdir(path_or_repo):
        return safetensors_files(path_or_repo)
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    repo = str(path_or_repo)
    try:
        index = hf_hub_download(repo, SAFE_WEIGHTS_INDEX_NAME)
    except EntryNotFoundError:
        return [hf_hub_download(repo, SAFE_WEIGHTS_NAME)]
    with open(index, encoding="utf-8") as f:
        weight_map = json.load(f)["weight_map"]
    patterns = [adapter.router_key] if routers_only else [adapter.router_key, adapter.expert_input_key]
    patterns += [] if routers_only or adapter.fused_input_key is None else [adapter.fused_input_key]
    shards = sorted({shard for key, shard in weight_map.items() if any(p.match(key) for p in patterns)})
    return [hf_hub_download(repo, shard) for shard in shards]
