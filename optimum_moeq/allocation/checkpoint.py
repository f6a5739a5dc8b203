"""Streaming pass over a checkpoint's safetensors: router rows and expert input projections.

Tensors are memory-mapped and read one at a time (one expert at a time from fused tensors),
so the cost is one read of the input projections and memory stays near one expert's weight.
"""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from ..models.adapter import MoEAdapter
from .allocation import LayerSignals
from .signals import max_neuron_variance, router_norm_change

_INDEX_NAME = "model.safetensors.index.json"
_SINGLE_NAME = "model.safetensors"


def safetensors_files(folder: str | os.PathLike) -> list[str]:
    """The safetensors shards of a local checkpoint folder."""
    folder = os.fspath(folder)
    index = os.path.join(folder, _INDEX_NAME)
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(folder, s) for s in shards]
    single = os.path.join(folder, _SINGLE_NAME)
    if os.path.isfile(single):
        return [single]
    raise FileNotFoundError(
        f"no {_SINGLE_NAME} or {_INDEX_NAME} in {folder!r}: allocation reads safetensors checkpoints only."
    )


def _matches_in(path: str, adapter: MoEAdapter) -> list[tuple[str, re.Match]]:
    """(kind, match) for each tensor of ``path`` the method reads; only the header is read."""
    patterns = (
        ("router", adapter.router_key),
        ("expert", adapter.expert_input_key),
        ("fused", adapter.fused_input_key),
    )
    with safe_open(path, framework="pt") as f:
        keys = list(f.keys())
    return [(kind, m) for key in keys for kind, pattern in patterns if pattern and (m := pattern.match(key))]


def read_layer_signals(
    files: Iterable[str], adapter: MoEAdapter, *, progress: bool = True, device: str | torch.device | None = None
) -> dict[str, LayerSignals]:
    """Router-norm change and MaxVar per expert of every MoE layer, keyed by experts module name.

    The next tensor is read from disk on a background thread while the current one is reduced
    (on ``device``: the GPU when there is one), so the pass costs about one read of the tensors.
    """
    files = [os.fspath(f) for f in files]
    if any(not f.endswith(".safetensors") for f in files):
        raise ValueError(f"allocation reads safetensors checkpoints only, got {files}.")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    jobs = []  # (path, kind, match, expert or None)
    for path in files:
        for kind, match in _matches_in(path, adapter):
            if kind == "fused":
                with safe_open(path, framework="pt") as f:
                    num_experts = f.get_slice(match.string).get_shape()[0]
                jobs += [(path, kind, match, e) for e in range(num_experts)]
            else:
                jobs.append((path, kind, match, None))
    routers: dict[str, list[float]] = {}
    maxvar: dict[str, dict[int, float]] = defaultdict(dict)
    with ExitStack() as stack, ThreadPoolExecutor(max_workers=1) as reader:
        handles = {path: stack.enter_context(safe_open(path, framework="pt")) for path in files}

        def load(job) -> torch.Tensor:
            path, kind, match, expert = job
            if kind != "fused":
                tensor = handles[path].get_tensor(match.string)
            else:
                fused = handles[path].get_slice(match.string)
                rows = fused.get_shape()[1]
                tensor = fused[expert, : rows // 2 if adapter.gated else rows, :]  # gate rows come first
            # get_tensor maps the file lazily; copying here makes this thread do the disk reads,
            # so they overlap the reduction of the previous tensor instead of stalling it.
            return tensor.clone()

        pending = reader.submit(load, jobs[0]) if jobs else None
        for i, job in enumerate(tqdm(jobs, desc="Reading routers and experts", disable=not progress)):
            tensor = pending.result().to(device)
            if i + 1 < len(jobs):
                pending = reader.submit(load, jobs[i + 1])
            _, kind, match, expert = job
            layer = adapter.experts_module_name(match)
            if kind == "router":
                routers[layer] = router_norm_change(tensor).tolist()
            else:
                maxvar[layer][int(match["expert"]) if expert is None else expert] = max_neuron_variance(tensor)
    return _assemble(routers, maxvar)


def read_router_norms(files: Iterable[str], adapter: MoEAdapter, *, progress: bool = True) -> dict[str, list[float]]:
    """Router row norms per experts module, reading the router tensors only (e.g. of a reference model)."""
    files = [os.fspath(f) for f in files]
    norms = {}
    for path in tqdm(files, desc="Reading reference routers", disable=not progress):
        routers = [match for kind, match in _matches_in(path, adapter) if kind == "router"]
        with safe_open(path, framework="pt") as f:
            for match in routers:
                norms[adapter.experts_module_name(match)] = router_norm_change(f.get_tensor(match.string)).tolist()
    if not norms:
        raise ValueError(f"no router weights found in the reference checkpoint files {files}.")
    return norms


def _assemble(routers: dict[str, list[float]], maxvar: dict[str, dict[int, float]]) -> dict[str, LayerSignals]:
    if not routers:
        raise ValueError("no MoE router weights found in the checkpoint: is this a Mixture-of-Experts model?")
    signals = {}
    for layer in sorted(routers, key=_natural_key):
        experts = maxvar.get(layer, {})
        missing = sorted(set(range(len(routers[layer]))) - set(experts))
        if missing:
            raise ValueError(f"{layer}: the checkpoint has a router but no input projection for experts {missing}.")
        signals[layer] = LayerSignals(routers[layer], [experts[e] for e in range(len(routers[layer]))])
    return signals


def _natural_key(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in name.split(".")]
