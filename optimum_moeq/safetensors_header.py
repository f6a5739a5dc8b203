"""A safetensors file's header: each tensor's dtype, shape and bytes, and the file's metadata."""

from __future__ import annotations

import json
import os
from typing import NamedTuple


class SafetensorsHeader(NamedTuple):
    tensors: dict[str, dict]  # name -> {"dtype", "shape", "data_offsets"}
    metadata: dict[str, str]
    data_start: int  # file offset of the data block the offsets count from

    def byte_range(self, name: str) -> tuple[int, int]:
        """Where tensor ``name``'s bytes lie in the file."""
        lo, hi = self.tensors[name]["data_offsets"]
        return self.data_start + lo, self.data_start + hi


def read_header(path: str | os.PathLike) -> SafetensorsHeader:
    """The header alone (8-byte little-endian length, then JSON); no tensor data is read."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    metadata = header.pop("__metadata__", None) or {}
    return SafetensorsHeader(header, metadata, 8 + size)
