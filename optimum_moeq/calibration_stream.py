"""Streaming GPTQ: the checkpoint walked one decoder layer at a time, before transformers loads it.

``from_pretrained`` builds the model on the meta device; before its weights load, this walk
builds a working copy (also on meta), reads the embeddings and then one decoder layer at a time
from the safetensors files, runs the calibration activations through it, quantizes it with GPTQ
(``calibration.py``'s per-layer steps), keeps only the packed tensors and the next layer's inputs,
and puts the layer back on the meta device. Peak memory: the packed tensors so far, one layer in
full precision and the activations. The packed tensors then take the place of the full-precision
weights as transformers streams them past (``QuantizeExperts``).
"""

from __future__ import annotations

import contextlib
import itertools

import torch
from safetensors import safe_open
from torch import nn

from .calibration import GptqReport, _first_layer_inputs, quantize_layer
from .calibration_data import calibration_tokens, window_length
from .nn import QUANTIZED_MODULES


class _CheckpointReader:
    """Tensors by checkpoint name across the shards, one shard open at a time."""

    def __init__(self, files):
        self._where = {}
        for path in files:
            with safe_open(path, framework="pt") as f:
                self._where.update(dict.fromkeys(f.keys(), path))

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def __getitem__(self, key: str) -> torch.Tensor:
        with safe_open(self._where[key], framework="pt") as f:
            return f.get_tensor(key)


def can_stream(model: nn.Module, adapter) -> bool:
    """The walk knows this model's structure: decoder layers whose buffers are all saved in the
    checkpoint, the embeddings and rotary embedding as the transformers decoders hold them."""
    base = getattr(model, "model", None)
    return (
        base is not None
        and all(hasattr(base, name) for name in ("embed_tokens", "rotary_emb"))
        and adapter.decoder_layers == "model.layers"
        and not any(module._non_persistent_buffers_set for module in base.layers.modules())
    )


def _read_checkpoint_tensor(reader: _CheckpointReader, adapter, key: str, out: torch.Tensor) -> None:
    """Copy the model tensor ``key`` from the checkpoint into ``out``: as named, under the family's
    aliases, or fused from the per-expert tensors, each read straight into its slice of ``out`` (a
    fused Mixtral gate_up is 1.75 GiB: no concatenated or stacked copies of it)."""
    names = adapter.checkpoint_names(key)
    for name in names:
        if name in reader:
            return _copy_checked(out, reader[name], key)
    gate, up, down = adapter.expert_tensor_names
    for name in names:
        base, _, field = name.rpartition(".")
        parts = {"gate_up_proj": (gate, up), "down_proj": (down,)}.get(field)
        if parts and base.endswith("experts") and f"{base}.0.{parts[0]}.weight" in reader:
            count = next(e for e in itertools.count() if f"{base}.{e}.{parts[0]}.weight" not in reader)
            if count != out.shape[0]:
                raise ValueError(f"{key}: the checkpoint holds {count} experts, the model {out.shape[0]}.")
            for e in range(count):
                row = 0
                for p in parts:
                    value = reader[f"{base}.{e}.{p}.weight"]
                    _copy_checked(out[e, row : row + value.shape[0]], value, f"{base}.{e}.{p}.weight")
                    row += value.shape[0]
                if row != out.shape[1]:
                    raise ValueError(f"{key}: the checkpoint's experts give {row} rows, the model {out.shape[1]}.")
            return None
    raise KeyError(f"the checkpoint has no tensor for {key} (tried {names}).")


def _copy_checked(out: torch.Tensor, value: torch.Tensor, name: str) -> None:
    if tuple(value.shape) != tuple(out.shape):
        raise ValueError(f"{name}: the checkpoint holds {tuple(value.shape)}, the model {tuple(out.shape)}.")
    out.copy_(value)


def _materialize(module: nn.Module, prefix: str, reader, adapter, device) -> None:
    module.to_empty(device=device)
    with torch.no_grad():
        for name, param in [*module.named_parameters(), *module.named_buffers()]:
            _read_checkpoint_tensor(reader, adapter, f"{prefix}.{name}", param)


def calibration_device(device_map) -> torch.device:
    """Where the walk computes: the first GPU that ``device_map`` names (a device, an index, a
    string, or a dict of them; "auto", "balanced" and "sequential" mean the current GPU) when CUDA
    is available, else the CPU. Each layer is computed there in full precision, one at a time."""
    if not torch.cuda.is_available() or device_map is None:
        return torch.device("cpu")
    targets = device_map.values() if isinstance(device_map, dict) else [device_map]
    for target in targets:
        if isinstance(target, int) or (isinstance(target, str) and target.isdigit()):
            return torch.device("cuda", int(target))
        if target in ("auto", "balanced", "balanced_low_0", "sequential"):
            return torch.device("cuda", torch.cuda.current_device())
        if isinstance(target, torch.device) or (isinstance(target, str) and target.startswith("cuda")):
            target = torch.device(target)
            if target.type == "cuda":
                return target if target.index is not None else torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@torch.no_grad()
def stream_gptq(model: nn.Module, checkpoint_files, adapter, config, tokenizer, quantize_linear, device_map=None):
    """Packed tensors by full parameter name for every experts module (and with ``attention_bits``
    every dense linear ``quantize_linear`` accepts), kept on the CPU, and the GPTQ report. The
    layers are computed on ``calibration_device(device_map)``."""
    device = calibration_device(device_map)
    with torch.device("cpu"):  # from_pretrained calls this under its meta-device context
        with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
            return _walk(model, checkpoint_files, adapter, config, tokenizer, quantize_linear, device)


def _walk(model, checkpoint_files, adapter, config, tokenizer, quantize_linear, device):
    with torch.device("meta"):
        work = type(model)(model.config)
    reader = _CheckpointReader(checkpoint_files)
    _materialize(work.model.embed_tokens, "model.embed_tokens", reader, adapter, device)
    rotary = work.model.rotary_emb
    with torch.device(device):
        work.model.rotary_emb = type(rotary)(config=work.config)
    seqlen = window_length(config.seqlen, model.config)
    tokens = calibration_tokens(config.dataset, tokenizer, config.nsamples, seqlen)
    layers = work.model.layers
    cached = _first_layer_inputs(work, layers[0], tokens)
    report, packed = GptqReport(), {}
    for index, layer in enumerate(layers):
        prefix = f"model.layers.{index}"
        _materialize(layer, prefix, reader, adapter, device)
        cached = quantize_layer(work, prefix, layer, cached, config, report, quantize_linear)
        for name, module in layer.named_modules():
            if isinstance(module, QUANTIZED_MODULES):
                packed.update({
                    f"{prefix}.{name}.{p}": getattr(module, p).detach().to("cpu") for p in module.stored_specs()
                })  # fmt: skip
        layer.to("meta")  # frees the layer; the packed tensors are kept above
    return packed, report
