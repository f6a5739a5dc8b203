"""What the Triton kernels ask of an NVIDIA GPU, found on any machine (no GPU needed).

``record_launches`` runs a forward with the kernel launches recorded instead of run;
``compile_for`` compiles a recorded launch, with its real arguments' types and launch options, for
an architecture (sm_90 = H100) and reads its shared memory, registers and spills from Triton's
compiler and ptxas. A launch that needs more shared memory than the GPU has fails there with
``OutOfResources``; a spill costs bandwidth. Needs TRITON_INTERPRET unset (the interpreter's
kernels cannot be compiled).
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from unittest import mock

import torch

SHARED_MEMORY_LIMIT = {90: 232448, 80: 166912}  # bytes one block may use: H100, A100
_TRITON_TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int32: "i32"}
_LAUNCH_OPTIONS = ("num_warps", "num_stages", "enable_fp_fusion")


@dataclass
class Launch:
    kernel: object  # the triton.JITFunction
    args: tuple
    kwargs: dict

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__

    def constants(self) -> dict:
        return {k: v for k, v in self.kwargs.items() if k not in _LAUNCH_OPTIONS}


@dataclass(frozen=True)
class Resources:
    shared_bytes: int
    registers: int
    spill_bytes: int
    loop_instructions: int  # SASS instructions of the longest loop body (the K loop), per thread
    loop_pipe_cycles: dict[str, float]  # a scheduler's cycles per pass of that loop, by pipe (PIPE_CYCLES)

    def pipe_bound(self) -> tuple[str, float]:
        """The pipe that bounds the loop and its cycles per pass."""
        return max(self.loop_pipe_cycles.items(), key=lambda item: item[1])


# Cycles one warp instruction holds a scheduler's pipe on sm_90, from the per-SM throughputs of
# the CUDA C++ Programming Guide (results per clock per SM over 4 schedulers x 32 lanes): every
# instruction takes an issue slot; 32-bit integer ALU work (LOP3, SHF, IADD3, ...) 64 per SM = 2
# cycles; IMAD and IDP share the FMA-heavy pipe at half rate; FFMA / FADD / FMUL run on both FMA
# pipes at full rate; conversions 16 per SM = 8 cycles. An estimate of the limits, not a timing.
_PIPES = {
    "alu": (
        2.0,
        (
            "LOP3",
            "SHF",
            "IADD3",
            "LEA",
            "ISETP",
            "SEL",
            "FSEL",
            "PRMT",
            "IABS",
            "IMNMX",
            "VIADD",
            "FSETP",
            "FMNMX",
            "SHL",
            "SHR",
            "LOP",
            "BMSK",
            "PLOP3",
            "P2R",
            "R2P",
        ),
    ),
    "fma_heavy": (2.0, ("IMAD", "IDP", "IDP4A", "IMUL", "IADD")),
    "fma": (1.0, ("FFMA", "FADD", "FMUL", "HFMA2", "HADD2", "HMUL2", "FFMA2")),
    "convert": (8.0, ("I2F", "F2I", "I2FP", "F2IP", "F2F", "F2FP", "FRND")),
}
PIPE_CYCLES = {pipe: cycles for pipe, (cycles, _) in _PIPES.items()}


def record_launches(forward: Callable[[], object]) -> list[Launch]:
    """The Triton launches ``forward()`` makes (on CPU tensors is fine), none of them run."""
    from . import grouped, triton_moe

    launches: list[Launch] = []

    class _Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append(Launch(self.kernel, args, kwargs))

    kernels = SimpleNamespace(**{name: _Recorder(getattr(triton_moe, name)) for name in dir(triton_moe)
                                 if name.startswith("_moe_")})  # fmt: skip
    with mock.patch.object(grouped, "_kernels", lambda: kernels):
        forward()
    return launches


def compile_for(launch: Launch, arch: int = 90):
    """Triton's compiled kernel of ``launch`` for sm_``arch``, specialised as a launch with these
    arguments would be (pointer and integer types, integers divisible by 16, integers equal to 1)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = launch.kernel
    if not hasattr(kernel, "params"):
        raise RuntimeError("compile_for needs the compiled kernels: run with TRITON_INTERPRET unset.")
    values = dict(zip(kernel.arg_names, launch.args)) | launch.constants()
    signature, constants, attributes = {}, {}, {}
    for index, param in enumerate(kernel.params):
        value = values[param.name]
        if param.is_constexpr or (isinstance(value, int) and value == 1):
            signature[param.name], constants[param.name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[param.name] = "*" + _TRITON_TYPES[value.dtype]
            attributes[(index,)] = [["tt.divisibility", 16]]  # torch allocations are 16-byte aligned
        elif isinstance(value, int):
            signature[param.name] = "i32" if abs(value) < 2**31 else "i64"
            if value % 16 == 0:
                attributes[(index,)] = [["tt.divisibility", 16]]
        else:
            raise TypeError(f"{param.name}={value!r}: no Triton type for {type(value).__name__}.")
    if "DOT_IN_FP32" in constants:
        constants["DOT_IN_FP32"] = False  # the GPU path (True only works around the interpreter)
    options = {k: launch.kwargs[k] for k in _LAUNCH_OPTIONS if k in launch.kwargs}
    source = ASTSource(kernel, signature, constants, attributes)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def resources_of(compiled, arch: int = 90) -> Resources:
    """Shared memory (from Triton), registers and spill bytes (ptxas -v on the PTX)."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as ptx:
        ptx.write(compiled.asm["ptx"])
        ptx.flush()
        gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        report = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name={gpu}", ptx.name, "-o", "/dev/null"],
                                capture_output=True, text=True, check=True).stderr  # fmt: skip
    registers = int(re.search(r"Used (\d+) registers", report).group(1))
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", report))
    opcodes = _loop_opcodes(compiled.asm["cubin"])
    return Resources(compiled.metadata.shared, registers, spills, len(opcodes), pipe_cycles(opcodes))


def pipe_cycles(opcodes: list[str]) -> dict[str, float]:
    """A scheduler's cycles for one warp to issue ``opcodes`` (SASS names, modifiers dropped), by
    pipe: "issue" counts every instruction once, each pipe its own at ``PIPE_CYCLES``."""
    cycles = {"issue": float(len(opcodes)), **dict.fromkeys(_PIPES, 0.0)}
    for opcode in opcodes:
        for pipe, (cost, names) in _PIPES.items():
            if opcode in names:
                cycles[pipe] += cost
    return cycles


def _loop_opcodes(cubin: bytes) -> list[str]:
    """Opcodes between a backward branch and its target, for the longest such loop (cuobjdump)."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True, check=True).stdout
    start, end = 0, -1
    for address, target in re.findall(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?P\d\s+)?BRA\s+(?:`\()?0x([0-9a-f]+)", sass):
        if int(target, 16) < int(address, 16) and int(address, 16) - int(target, 16) > end - start:
            start, end = int(target, 16), int(address, 16)
    found = re.findall(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T\d]\s+)?([A-Z][A-Z0-9_]*)", sass)
    return [opcode for address, opcode in found if start <= int(address, 16) <= end]
