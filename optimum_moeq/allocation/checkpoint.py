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
from typing import NamedTuple

import torch
from safetensors import safe_open
from tqdm.auto import tqdm
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

from ..models.adapter import MoEAdapter
from ..safetensors_header import read_header
from .allocation import LayerSignals
from .signals import max_neuron_variance, router_norm_change


def safetensors_files(folder: str | os.PathLike) -> list[str]:
    """The safetensors shards of a local checkpoint folder."""
    folder = os.fspath(folder)
    index = os.path.join(folder, SAFE_WEIGHTS_INDEX_NAME)
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        root = os.path.realpath(folder)
        outside = [s for s in shards if os.path.commonpath([root, os.path.realpath(os.path.join(root, s))]) != root]
        if outside:
            raise ValueError(
                f"{index} names shard {outside[0]!r}, outside the model folder: the index is damaged or hostile."
            )
        return [os.path.join(folder, s) for s in shards]
    single = os.path.join(folder, SAFE_WEIGHTS_NAME)
    if os.path.isfile(single):
        return [single]
    raise FileNotFoundError(
        f"no {SAFE_WEIGHTS_NAME} or {SAFE_WEIGHTS_INDEX_NAME} in {folder!r}: "
        "allocation reads safetensors checkpoints only."
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


def _advise_will_need(fd: int, byte_range: tuple[int, int]) -> None:
    """Ask the kernel to start reading ``byte_range`` into the page cache now (asynchronously): the
    memory-mapped reads that come later then hit cached pages instead of faulting each in from disk."""
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, byte_range[0], byte_range[1] - byte_range[0], os.POSIX_FADV_WILLNEED)


class _Job(NamedTuple):
    """One tensor the scan reads: a router, or one expert's input projection (gate rows only)."""

    path: str
    kind: str  # "router", "expert" (one tensor per expert) or "fused" (one expert of [E, rows, H])
    match: re.Match
    expert: int | None  # the expert within a fused tensor
    byte_range: tuple[int, int]  # where its bytes are in the file


class _OneShardOpen:
    """``safe_open`` handles, one shard at a time: a shard is closed when the next is opened, so
    the pages its memory map brought in leave the process's resident memory with it."""

    def __init__(self):
        self._path, self._file, self._stack = None, None, ExitStack()

    def __call__(self, path: str):
        if path != self._path:
            self._stack.close()
            self._path, self._file = path, self._stack.enter_context(safe_open(path, framework="pt"))
        return self._file

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._stack.close()


def _read_jobs(files: list[str], adapter: MoEAdapter) -> list[_Job]:
    jobs = []
    for path in files:
        header = read_header(path)
        for kind, match in _matches_in(path, adapter):
            start, end = header.byte_range(match.string)
            if kind != "fused":
                jobs.append(_Job(path, kind, match, None, (start, end)))
                continue
            with safe_open(path, framework="pt") as f:
                num_experts, rows, _ = f.get_slice(match.string).get_shape()
            row_bytes = (end - start) // (num_experts * rows)
            wanted = adapter.input_rows(rows)
            for e in range(num_experts):
                first = start + e * rows * row_bytes
                jobs.append(_Job(path, kind, match, e, (first, first + wanted * row_bytes)))
    return jobs


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
    jobs = _read_jobs(files, adapter)
    routers: dict[str, list[float]] = {}
    maxvar: dict[str, dict[int, float]] = defaultdict(dict)
    with ExitStack() as stack, ThreadPoolExecutor(max_workers=1) as reader:
        open_shard = stack.enter_context(_OneShardOpen())
        fds = {}
        for path in files:  # each closed by the stack as soon as it is open, whatever fails next
            fds[path] = os.open(path, os.O_RDONLY)
            stack.callback(os.close, fds[path])

        # Two buffers, reused: the reader fills one while the caller reduces the other. Fresh
        # memory for each tensor would page-fault on every 4 KiB of the copy.
        largest = max((end - start for *_, (start, end) in jobs), default=0)
        buffers = [torch.empty(largest, dtype=torch.uint8, device="cpu") for _ in range(2)]

        def load(i: int) -> torch.Tensor:
            # the kernel reads tensor i+1 into the page cache while this thread copies tensor i
            if i + 1 < len(jobs):
                _advise_will_need(fds[jobs[i + 1].path], jobs[i + 1].byte_range)
            path, kind, match, expert, _ = jobs[i]
            shard = open_shard(path)
            if kind != "fused":
                tensor = shard.get_tensor(match.string)
            else:
                fused = shard.get_slice(match.string)
                rows = fused.get_shape()[1]
                tensor = fused[expert, : adapter.input_rows(rows), :]
            # get_tensor maps the file lazily; copying here makes this thread do the disk reads,
            # so they overlap the reduction of the previous tensor instead of stalling it.
            nbytes = tensor.numel() * tensor.element_size()
            return buffers[i % 2][:nbytes].view(tensor.dtype).view(tensor.shape).copy_(tensor)

        if jobs:
            _advise_will_need(fds[jobs[0].path], jobs[0].byte_range)
            pending = reader.submit(load, 0)
        for i, job in enumerate(tqdm(jobs, desc="Reading routers and experts", disable=not progress)):
            tensor = pending.result().to(device)
            if i + 1 < len(jobs):
                pending = reader.submit(load, i + 1)
            _, kind, match, expert, _ = job
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
        raise ValueError(
            f"no router weights found in the reference checkpoint files {files}: its tensors are not named as this "
            "model's routers are; reference_model must be this model's own architecture before fine-tuning."
        )
    return norms


def router_shapes(files: Iterable[str], adapter: MoEAdapter) -> dict[str, tuple[int, ...]]:
    """Each router's [experts, hidden] shape by experts module, from the headers alone."""
    shapes = {}
    for path in files:
        routers = [match for kind, match in _matches_in(os.fspath(path), adapter) if kind == "router"]
        with safe_open(os.fspath(path), framework="pt") as f:
            for match in routers:
                shapes[adapter.experts_module_name(match)] = tuple(f.get_slice(match.string).get_shape())
    return shapes


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
