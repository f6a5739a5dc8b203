"""A pre-quantized checkpoint checked against the model built for it.

transformers casts a tensor whose stored dtype differs from the parameter's and reports a missing
or mis-shaped one and loads on: for packed codes that means garbage or uninitialised weights. So
before any weight is read, every packed tensor's stored dtype and shape (whatever wrote the file)
must be what the allocation implies. The shapes only say how many experts have each width, not
which: each shard records the allocation it was saved with and a digest of every packed tensor
(safetensors metadata, the same in every shard of one save), and a config.json whose allocation
differs, shards of different saves, or a checkpoint that lost the record while an experts module
mixes widths, are refused. The digests themselves are checked by ``verify_checkpoint`` (``moeq verify``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

from .digests import DIGESTS_METADATA_KEY, digests_of, file_digests
from .safetensors_header import SafetensorsHeader, read_header

ALLOCATION_METADATA_KEY = "moeq_allocation"

_SAFETENSORS_DTYPES = {
    torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.int32: "I32",
    torch.int64: "I64", torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64",
}  # fmt: skip
_RESAVE = (
    "re-save it with save_pretrained from a model loaded from the original checkpoint (max_shard_size= re-shards "
    "and keeps the record), or re-quantize the original model"
)


def stored_tensors(
    model: nn.Module, quantized_types: tuple[type, ...]
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """(shape, dtype) of every stored tensor of the quantized modules, by full name."""
    return {
        f"{module_name}.{name}": spec
        for module_name, module in model.named_modules()
        if isinstance(module, quantized_types)
        for name, spec in module.stored_specs().items()
    }


def checkpoint_metadata(model: nn.Module, quantized_types: tuple[type, ...], allocation) -> dict[str, str]:
    """safetensors metadata for a save: the allocation and the packed tensors' digests. Refuses a
    model whose scales or zeros are not finite (they would load as NaN outputs)."""
    tensors = {
        f"{module_name}.{name}": tensor
        for module_name, module in model.named_modules()
        if isinstance(module, quantized_types)
        for name, tensor in module.named_parameters(recurse=False)
        if name in module.stored_specs()
    }
    check_finite(tensors.items(), "cannot save")
    return {
        ALLOCATION_METADATA_KEY: json.dumps(allocation, sort_keys=True),
        DIGESTS_METADATA_KEY: json.dumps(digests_of(tensors, allocation), sort_keys=True),
    }


def check_finite(tensors: Iterable[tuple[str, torch.Tensor]], action: str) -> None:
    for name, tensor in tensors:
        if tensor.is_floating_point() and not tensor.is_meta and not bool(torch.isfinite(tensor).all()):
            raise ValueError(
                f"{action}: {name} holds NaN or infinite values (the weights it was quantized from were not "
                "finite, or the file was damaged); re-quantize from a finite checkpoint."
            )


def disk_names(names: Iterable[str], header_names: set[str], adapter) -> dict[str, str]:
    """Each model tensor name found in the files to its name there (``adapter.checkpoint_names``)."""
    found = {}
    for name in names:
        candidate = next((c for c in adapter.checkpoint_names(name) if c in header_names), None)
        if candidate is not None:
            found[name] = candidate
    return found


def read_headers(checkpoint_files: Iterable[str]) -> dict[str, SafetensorsHeader | None]:
    """Each checkpoint file's safetensors header (None for a file of another format)."""
    return {str(p): read_header(p) if str(p).endswith(".safetensors") else None for p in checkpoint_files}


def check_checkpoint(
    checkpoint_files: Iterable[str],
    expected: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
    allocation: Mapping[str, list[int]],
    adapter,
) -> None:
    """Before any weight loads: dtypes, shapes and the recorded allocation (see the module's doc)."""
    headers = read_headers(checkpoint_files)
    tensors = {name: info for h in headers.values() if h is not None for name, info in h.tensors.items()}
    for name, disk_name in disk_names(expected, set(tensors), adapter).items():
        shape, dtype = expected[name]
        info = tensors[disk_name]
        if info["dtype"] != _SAFETENSORS_DTYPES.get(dtype) or tuple(info["shape"]) != tuple(shape):
            raise stored_mismatch(disk_name, info["dtype"], info["shape"], dtype, shape)
    _check_records(headers, allocation)


def stored_mismatch(disk_name: str, stored_dtype, stored_shape, dtype: torch.dtype, shape) -> ValueError:
    """The error for a packed tensor stored with another dtype or shape than the allocation implies
    (``stored_dtype``: a safetensors dtype string or a torch dtype)."""
    stored_dtype = _SAFETENSORS_DTYPES.get(stored_dtype, stored_dtype)
    return ValueError(
        f"{disk_name} is stored as {stored_dtype} {list(stored_shape)}, but the allocation in config.json implies "
        f"{_SAFETENSORS_DTYPES.get(dtype)} {list(shape)}: the file was converted (a dtype cast of every tensor?) or "
        f"does not belong to this config.json; {_RESAVE}."
    )


def check_records(checkpoint_files: Iterable[str], allocation: Mapping[str, list[int]]) -> None:
    """Refuse shards of different saves, or a config.json whose allocation is not the one the
    packed weights were saved with (the record in the safetensors metadata)."""
    _check_records(read_headers(checkpoint_files), allocation)


def _check_records(headers: Mapping[str, SafetensorsHeader | None], allocation: Mapping[str, list[int]]) -> None:
    recorded = {
        (h.metadata.get(ALLOCATION_METADATA_KEY), h.metadata.get(DIGESTS_METADATA_KEY))
        for h in headers.values()
        if h is not None and h.metadata.get(ALLOCATION_METADATA_KEY) is not None
    }
    if len(recorded) > 1:
        raise ValueError(
            "the checkpoint's shards come from different saves (their recorded allocations or digests differ): "
            f"restore the shards saved together, or {_RESAVE}."
        )
    if not recorded:
        mixed = sorted(name for name, bits in allocation.items() if len(set(bits)) > 1)
        if mixed:
            raise ValueError(
                "the checkpoint records no allocation (its shards lack optimum-moeq's safetensors metadata: "
                "re-sharded or converted by a tool that drops it, or not safetensors), and the packed shapes fix "
                f"only how many experts have each width, not which, so config.json's allocation of {mixed[0]} cannot "
                f"be checked: {_RESAVE}."
            )
        return
    ((saved_allocation, _),) = recorded
    if json.loads(saved_allocation) != allocation:
        raise ValueError(
            "config.json's allocation does not match the one the packed weights were saved with "
            "(config.json edited, or left by a failed save over this folder): re-quantize, or restore "
            "the config.json saved with these weights."
        )


def verify_digests(
    headers: Mapping[str, SafetensorsHeader | None], allocation: Mapping[str, list[int]], adapter
) -> int:
    """Hash every packed tensor in the files and compare with the digests recorded at save; the
    first that differs is named. Returns how many were checked (0: no digests recorded, a save by
    an older optimum-moeq)."""
    headers = {path: h for path, h in headers.items() if h is not None}
    digests = next(
        (h.metadata[DIGESTS_METADATA_KEY] for h in headers.values() if DIGESTS_METADATA_KEY in h.metadata), None
    )
    if digests is None:
        return 0
    recorded = json.loads(digests)
    checked = {}
    for path, header in headers.items():
        checked.update(file_digests(path, header, disk_names(recorded, set(header.tensors), adapter), allocation))
    for name, digest in recorded.items():
        if checked.get(name) != digest:
            problem = "is missing" if name not in checked else "does not match the digest recorded when it was saved"
            raise ValueError(
                f"{name} {problem}: the file was damaged or edited, a shard replaced, or config.json's allocation "
                f"changed; re-download or {_RESAVE}."
            )
    return len(recorded)


def check_all_loaded(
    model: nn.Module, quantized_types: tuple[type, ...], also: Callable[[str], bool] = lambda name: False
) -> None:
    """After loading: every stored tensor of the quantized modules (and of the modules ``also``
    names) came from the checkpoint (transformers flags what it loads; a missing or mis-shaped
    tensor stays uninitialised), and none of their scales or zeros is NaN or infinite. Tensors a
    device map offloaded to disk or CPU sit on the meta device and are not checked."""
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
    check_finite(
        (
            (f"{module_name}.{name}", tensor)
            for module_name, module in model.named_modules()
            if isinstance(module, quantized_types)
            for name, tensor in module.named_parameters(recurse=False)
            if name in module.stored_specs()
        ),
        "refusing to load",
    )


def verify_checkpoint(folder: str | os.PathLike) -> int:
    """``moeq verify OUT``: every packed tensor of a saved folder against the digests recorded at
    save (``verify_digests``); returns how many were checked."""
    from transformers import AutoConfig

    from .allocation.checkpoint import safetensors_files
    from .models import get_adapter

    config = AutoConfig.from_pretrained(folder)
    quantization = getattr(config, "quantization_config", None) or {}
    quantization = quantization if isinstance(quantization, dict) else quantization.to_dict()
    if quantization.get("quant_method") != "moeq" or not quantization.get("allocation"):
        raise ValueError(f"{folder} is not an optimum-moeq checkpoint (its config has no moeq quantization_config).")
    headers = read_headers(safetensors_files(folder))
    _check_records(headers, quantization["allocation"])
    return verify_digests(headers, quantization["allocation"], get_adapter(config))
