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


def own_peak_rss() -> int:
    """This process's own peak resident memory in bytes (Linux VmHWM). Not ``ru_maxrss``: it survives
    exec, so a child started by ``subprocess`` (vfork) reports its parent's peak when that is higher."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


class PeakWhere:
    """Where a process's resident memory peaks: a thread reads the RSS every ``interval`` seconds
    and, whenever it passes the highest seen, keeps the main thread's innermost frames in the
    named packages, and the highest RSS seen in each innermost such function (``by_place``: the
    peak of each phase). ``own_peak_rss()`` gives the peak's exact size; this gives the code running."""

    def __init__(self, packages=("optimum_moeq", "transformers"), interval: float = 0.02, frames: int = 4):
        import threading

        self._packages, self._interval, self._frames = packages, interval, frames
        self._main = threading.main_thread().ident
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self.peak_bytes, self.where, self.by_place = 0, [], {}

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self) -> None:
        import traceback

        while not self._stop.wait(self._interval):
            rss = self._rss()
            frame = sys._current_frames().get(self._main)
            stack = traceback.extract_stack(frame) if frame is not None else []
            ours = [f"{os.path.basename(f.filename)}:{f.lineno} {f.name}" for f in stack
                    if any(f"/{p}/" in f.filename for p in self._packages)]  # fmt: skip
            if ours:
                file_line, function = ours[-1].split(" ")
                place = f"{file_line.split(':')[0]} {function}"
                self.by_place[place] = max(self.by_place.get(place, 0), rss)
            if rss > self.peak_bytes:
                self.peak_bytes, self.where = rss, ours[-self._frames :]


def watch_rss(process, interval: float = 0.01) -> dict:
    """Until ``process`` (a subprocess.Popen) exits: its resident memory sampled from outside every
    ``interval`` s, so that no call holding the child's GIL hides a peak from the sampler, with the
    anonymous / file-backed split at the peak (Linux /proc). Returns the peak and its split in bytes."""
    peak = {"rss": 0, "anon": 0, "file": 0}
    fields = {"VmRSS:": "rss", "RssAnon:": "anon", "RssFile:": "file"}
    while process.poll() is None:
        try:
            with open(f"/proc/{process.pid}/status") as f:
                now = {fields[words[0]]: int(words[1]) * 1024 for words in map(str.split, f) if words[0] in fields}
        except (FileNotFoundError, ProcessLookupError):  # exited between poll() and open()
            break
        if now.get("rss", 0) > peak["rss"]:
            peak.update(now)
        time.sleep(interval)
    return peak
