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
    return Resources(compiled.metadata.shared, registers, spills, _loop_instructions(compiled.asm["cubin"]))


def _loop_instructions(cubin: bytes) -> int:
    """Instructions between a backward branch and its target, for the longest such loop (cuobjdump)."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True, check=True).stdout
    longest = 0
    for address, target in re.findall(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?P\d\s+)?BRA\s+(?:`\()?0x([0-9a-f]+)", sass):
        start, end = int(target, 16), int(address, 16)
        if start < end:  # 16 bytes per instruction
            longest = max(longest, (end - start) // 16 + 1)
    return longest
