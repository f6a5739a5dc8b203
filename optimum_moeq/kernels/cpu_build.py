"""Build and load the CPU kernels (``kernels/cpu/packed_gemm.c``).

The C source is compiled once per machine with the system C compiler (``$CC``, else ``cc``) into
``$MOEQ_CPU_KERNEL_CACHE`` (default ``~/.cache/optimum_moeq/cpu_kernels``), keyed by the source,
the flags and the compiler, and loaded with ctypes: about a second, no Python headers, no ninja.
It links OpenMP through ``libgomp.so.1``, the soname of the runtime torch loads, so both share one
thread pool. Where it cannot be built (no compiler, no OpenMP), the packed modules fall back to the
torch reference with one warning.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu", "packed_gemm.c")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11")


class ExpertRecord(ctypes.Structure):
    """``moeq_expert`` in packed_gemm.c: one expert's planes and metadata, by address."""

    _fields_ = [
        ("bits", ctypes.c_int32),
        ("q2", ctypes.c_void_p),
        ("q1", ctypes.c_void_p),
        ("scale", ctypes.c_void_p),
        ("zero", ctypes.c_void_p),
        ("zero_codes", ctypes.c_int32),  # zero holds integer zeros (int32 words), not float16
    ]


class LayerRecord(ctypes.Structure):
    """``moeq_layer`` in packed_gemm.c: a SiLU-gated experts layer's shapes and address tables."""

    _fields_ = [
        ("E", ctypes.c_int32),
        ("H", ctypes.c_int32),
        ("I", ctypes.c_int32),
        ("G", ctypes.c_int32),
        ("gate_up", ctypes.POINTER(ExpertRecord)),
        ("down", ctypes.POINTER(ExpertRecord)),
    ]


# flags of moeq_experts_forward and moeq_linear (packed_gemm.c)
IO_BF16, WEIGHT_BF16 = 1, 2


def cache_folder() -> str:
    default = os.path.join(os.path.expanduser("~"), ".cache", "optimum_moeq", "cpu_kernels")
    return os.environ.get("MOEQ_CPU_KERNEL_CACHE", default)


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "cc"))


# What each build variant adds to FLAGS: "native" all this machine has (AVX-512 where it is),
# "avx2" the AVX2 code of a machine without AVX-512, "portable" plain C only (no AVX2).
VARIANTS = {"native": (), "avx2": ("-mno-avx512f",), "portable": ("-DMOEQ_PORTABLE",)}


def build(variant: str = "native") -> str:
    """Path of the compiled library of a build ``variant`` (see VARIANTS; the others build the code
    paths of machines with less than this one), built if missing. Raises RuntimeError with the
    compiler's output."""
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError(f"no C compiler found (looked for {os.environ.get('CC', 'cc')!r}; set $CC)")
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r}: allowed are {sorted(VARIANTS)}.")
    flags = (*FLAGS, *VARIANTS[variant])
    with open(SOURCE, "rb") as f:
        source = f.read()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(source + repr((flags, compiler, version)).encode()).hexdigest()[:16]
    folder = cache_folder()
    target = os.path.join(folder, f"packed_gemm-{key}.so")
    if os.path.isfile(target):
        return target
    os.makedirs(folder, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as scratch:  # built aside, then renamed into place
        built = os.path.join(scratch, "packed_gemm.so")
        result = subprocess.run([compiler, *flags, SOURCE, "-o", built, "-lm"], capture_output=True, text=True)
        if result.returncode:
            raise RuntimeError(f"{compiler} failed to build {SOURCE}:\n{result.stderr.strip()}")
        os.replace(built, target)
    return target


def _load(path: str) -> ctypes.CDLL:
    library = ctypes.CDLL(path)
    library.moeq_packed_gemm.restype = ctypes.c_int
    library.moeq_packed_gemm.argtypes = [
        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int,
        ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.POINTER(ExpertRecord), ctypes.c_int, ctypes.c_int,
        ctypes.c_int,
    ]  # fmt: skip
    library.moeq_experts_forward.restype = ctypes.c_int
    library.moeq_experts_forward.argtypes = [
        ctypes.POINTER(LayerRecord), ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
        ctypes.c_void_p, ctypes.c_int, ctypes.c_int,
    ]  # fmt: skip
    library.moeq_linear.restype = ctypes.c_int
    library.moeq_linear.argtypes = [
        ctypes.POINTER(ExpertRecord), ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int,
        ctypes.c_void_p, ctypes.c_int, ctypes.c_int,
    ]  # fmt: skip
    library.moeq_has_avx2.restype = ctypes.c_int
    library.moeq_has_bf16.restype = ctypes.c_int
    library.moeq_lut_bits.restype = ctypes.c_int
    return library


@functools.cache
def library(variant: str = "native") -> ctypes.CDLL | None:
    """The loaded kernels, or None (with one warning) where they cannot be built here."""
    if os.environ.get("MOEQ_CPU_KERNELS", "1") == "0":
        return None
    try:
        return _load(build(variant))
    except (RuntimeError, OSError) as err:
        warnings.warn(
            f"optimum-moeq's CPU kernels are unavailable ({err}); packed modules run the slower torch reference. "
            "Install a C compiler with OpenMP (e.g. apt install gcc) to enable them.",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
