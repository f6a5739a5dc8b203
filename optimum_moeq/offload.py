"""Checks on disk offload that must fail before the checkpoint is read, not halfway through loading."""

from __future__ import annotations

import inspect
import os


def offload_folder_of_current_load() -> str | None:
    """The ``offload_folder`` passed to the ``from_pretrained`` call now running, or None.

    transformers (5.24: ``from_pretrained`` passes no hook or argument of a quantizer the folder)
    hands quantizers the device map but not the offload folder, and only touches the folder once
    loading has begun; reading the argument from the caller's frame lets a bad folder
    fail before the allocation scan. If transformers renames the argument this returns None and the
    check is skipped (transformers' own error then comes later), never a wrong answer.
    """
    frame = inspect.currentframe()
    try:
        while frame is not None:
            code = frame.f_code
            if code.co_name == "from_pretrained" and code.co_filename.endswith("modeling_utils.py"):
                folder = frame.f_locals.get("offload_folder")
                return None if folder is None else os.fspath(folder)
            frame = frame.f_back
        return None
    finally:
        del frame  # a frame held in a local keeps the whole call stack alive


def may_offload_to_disk(device_map) -> bool:
    """Whether ``device_map`` can place weights on disk: "auto"-style strategies may, a dict only if
    it says "disk", a single device never."""
    if isinstance(device_map, dict):
        return "disk" in device_map.values()
    return device_map in ("auto", "balanced", "balanced_low_0", "sequential")


def check_offload_folder(folder: str) -> None:
    """Raise if ``folder`` could not be created and written to. Nothing is created: transformers
    makes the folder itself, and only if something goes to disk."""
    path = os.path.abspath(folder)
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    problem = None
    if not os.path.isdir(existing):
        problem = f"{existing} is a file"
    elif not os.access(existing, os.W_OK | os.X_OK):
        problem = f"{existing} is not writable"
    if problem:
        raise ValueError(
            f"offload_folder={folder!r} cannot be written ({problem}); "
            "pass a folder you can write to, with room for the offloaded packed weights."
        )


def modules_needing_offload_folder(device_map: dict, experts_modules) -> list[str]:
    """Experts modules that ``device_map`` puts on disk: quantize-on-load writes their packed weights
    to the offload folder, since they exist in no checkpoint file."""
    disk = [name for name, device in device_map.items() if device == "disk"]
    return [
        module
        for module in experts_modules
        if any(name == "" or module == name or module.startswith(name + ".") for name in disk)
    ]
