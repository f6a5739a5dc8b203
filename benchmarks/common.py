"""Timing, bandwidth and table helpers shared by the benchmarks."""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import torch


def smoke_environment(smoke: bool) -> None:
    """``--smoke`` runs the benchmark's code on CPU through the Triton interpreter, tiny sizes:
    a check that the script works, never a speed figure."""
    if smoke:
        os.environ["TRITON_INTERPRET"] = "1"
    elif not torch.cuda.is_available():
        sys.exit("This benchmark measures GPU speed and needs a CUDA device; run it with --smoke to check it on CPU.")


def results_path(name: str, smoke: bool) -> str:
    """Where a table goes: benchmarks/results/ for measurements; a --smoke run's tables go to the
    git-ignored benchmarks/.smoke/ so that they never replace the recorded figures."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), ".smoke" if smoke else "results", name)


def median_ms(fn: Callable[[], object], device: torch.device, reps: int = 50) -> float:
    """Median milliseconds of ``fn``; on CUDA, triton's do_bench (L2 flushed between runs)."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=max(reps, 25), return_mode="median")
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Measured device copy bandwidth in bytes/s (bytes read + bytes written)."""
    if device.type != "cuda":
        nbytes = 1 << 24
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device)
    return 2 * nbytes / (ms * 1e-3)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (Triton interpreter: not speed)"


def write_table(path: str, title: str, header: Sequence[str], rows: Sequence[Sequence[object]], notes: str) -> str:
    """Print a markdown table and write it (with its notes) to ``path``."""
    lines = [f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    text = "\n".join(lines + ["", notes, ""])
    print(text)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return text
