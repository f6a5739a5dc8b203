"""Content digests of the packed tensors: recorded in each shard at save, checked on demand.

A digest is SHA-256 (hardware-accelerated on current x86 and Arm CPUs: faster here than blake2)
over the tensor's name, the bit-widths of its module in the allocation and the tensor's bytes, so
a flipped byte, two tensors swapped under each other's names, shards from another save, or an
allocation edited in config.json and the metadata alike are all told apart from the saved model.
Files are hashed from a memory map, one tensor per thread (hashlib releases the GIL).
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor

import torch

from .safetensors_header import SafetensorsHeader

DIGESTS_METADATA_KEY = "moeq_digests"


def tensor_digest(name: str, bits: list[int] | None, data) -> str:
    """Hex digest of ``data`` (bytes-like) as the tensor ``name`` of a module with ``bits``."""
    h = hashlib.sha256(json.dumps([name, bits]).encode())
    h.update(data)
    return h.hexdigest()[:32]


def module_bits(name: str, allocation: Mapping[str, list[int]]) -> list[int] | None:
    """The allocation's bits for the module owning tensor ``name`` (None for a dense linear)."""
    return allocation.get(name.rpartition(".")[0])


def digests_of(tensors: Mapping[str, torch.Tensor], allocation: Mapping[str, list[int]]) -> dict[str, str]:
    """Digests of in-memory tensors (any device), by name, as the files will hold their bytes."""

    def one(item):
        name, tensor = item
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        return name, tensor_digest(name, module_bits(name, allocation), memoryview(data))

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return dict(pool.map(one, tensors.items()))


def file_digests(
    path: str | os.PathLike, header: SafetensorsHeader, on_disk: Mapping[str, str], allocation: Mapping[str, list[int]]
) -> dict[str, str]:
    """Digests of the tensors ``on_disk`` names (model name -> name in the file ``path``, whose
    ``header`` is given), hashed from the file's bytes."""
    if not on_disk:
        return {}
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        view = memoryview(mapped)
        try:

            def one(name):
                start, end = header.byte_range(on_disk[name])
                return name, tensor_digest(name, module_bits(name, allocation), view[start:end])

            with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
                return dict(pool.map(one, on_disk))
        finally:
            view.release()
