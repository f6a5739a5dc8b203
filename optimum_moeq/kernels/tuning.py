"""Launch parameters of the Triton MoE kernels, in one place so a GPU can be tuned without code edits.

The defaults are heuristics chosen without a GPU to measure on; ``benchmarks/kernels.py --sweep``
times alternatives on the device and prints the best per batch size, and
``with kernel_tuning(gemm_block_n=128): ...`` applies one.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator


@dataclasses.dataclass(frozen=True)
class KernelTuning:
    decode_max_pairs: int = 32  # at or below this many (token, expert) pairs the GEMV kernel runs
    # Decode with 16-bit activations: "float" or "dp4a" (integer dot products on activations quantized
    # per K step). On an H200 (benchmarks/results/kernels.md) dp4a with int8 activations is as fast as
    # float at 2 bits and up to 1.4x faster at 3-4 bits when replayed from a CUDA graph, but was 4-7x
    # slower eager while its activations were quantized by a dozen small torch ops (one launch since,
    # not yet timed), and its perplexity on the testbed is not measured yet: opt-in until both are.
    gemv_kernel: str = "float"
    activation_digits: int = 1  # dp4a's activations: 1 (int8) or 2 (two int8 digits: slower than float)
    dp4a_asm: bool = True  # the dp4a PTX instruction (False: the same integers in plain Triton)
    # dp4a tiles: 4 columns per thread, so that a thread holds every word of its columns in a K step
    # and sums them without shuffles or barriers (offline sm_90: 1.0 instructions per weight at 2
    # bits and 1.8-2.1 at 3, against 2.1-2.3 and 3.2-3.6 with 64 columns over 4 warps)
    dp4a_block_n: int = 128
    dp4a_warps: int = 1
    gemv_block_n: int = 64  # output columns per GEMV program
    gemv_warps: int = 4
    target_programs: int = 1024  # split K until a GEMV launch has about this many programs
    gemm_block_m_small: int = 16  # rows per tl.dot block when experts get few tokens each
    gemm_block_m: int = 64  # ... and when they get many (above 8 pairs per expert on average)
    gemm_block_n: int = 64
    gemm_warps: int = 4
    gemm_stages: int = 3

    def __post_init__(self):
        powers_of_two = {
            "gemv_block_n": (16, 256),
            "dp4a_block_n": (16, 512),
            "dp4a_warps": (1, 16),
            "gemm_block_m_small": (16, 128),
            "gemm_block_m": (16, 256),
            "gemm_block_n": (16, 256),
            "gemv_warps": (1, 16),
            "gemm_warps": (1, 16),
        }
        for name, (low, high) in powers_of_two.items():
            value = getattr(self, name)
            if not (isinstance(value, int) and low <= value <= high and value & (value - 1) == 0):
                raise ValueError(f"{name}={value!r}: must be a power of two from {low} to {high}.")
        choices = {"gemv_kernel": ("dp4a", "float"), "activation_digits": (1, 2), "dp4a_asm": (True, False)}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed or type(getattr(self, name)) is not type(allowed[0]):
                raise ValueError(f"{name}={getattr(self, name)!r} is not supported: allowed are {allowed}.")
        for name in ("decode_max_pairs", "target_programs", "gemm_stages"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"{name}={value!r}: must be a positive integer.")


_current = KernelTuning()


def current_tuning() -> KernelTuning:
    return _current


@contextlib.contextmanager
def kernel_tuning(**changes) -> Iterator[KernelTuning]:
    """Run the block with some launch parameters changed, e.g. ``kernel_tuning(gemm_block_n=128)``."""
    global _current
    unknown = set(changes) - {f.name for f in dataclasses.fields(KernelTuning)}
    if unknown:
        raise ValueError(f"unknown kernel parameters {sorted(unknown)}; known: {list(KernelTuning.__annotations__)}.")
    previous, _current = _current, dataclasses.replace(_current, **changes)
    try:
        yield _current
    finally:
        _current = previous
