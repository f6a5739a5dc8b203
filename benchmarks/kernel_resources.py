"""What each kernel launch asks of an H100, measured on any machine (no GPU needed).

    python benchmarks/kernel_resources.py    # table to benchmarks/results/kernel_resources.md

The experts layer of Mixtral-8x7B shape (2, 3, 4 and 8 bits, bf16 activations) at decode (1 token)
and prefill (2048 tokens), under the default ``KernelTuning`` and every prefill candidate of
``kernel_sweep.py``: each launch is compiled for sm_90 with its real argument types and launch
options, and the table gives its shared memory (a launch over the limit cannot run), registers,
spill bytes (from ptxas) and the SASS instructions of its K loop per weight a thread decodes
(cuobjdump): at batch 1 the GEMV is bound by these, not by memory, when
instructions/weight x weights/s / 32 exceeds the GPU's warp-instruction rate. Decode candidates
change no resource that matters (2 KB of shared memory, no spills), so only their defaults are
listed.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported: compiled kernels, not interpreted
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import results_path, write_table  # noqa: E402
from kernel_sweep import PREFILL_GRID, candidates  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10 (90: H100, 80: A100)")
    parser.add_argument("--out", help="table path (default: benchmarks/results/kernel_resources.md)")
    args = parser.parse_args()
    args.out = args.out or results_path("kernel_resources.md", False)
    from optimum_moeq.kernels.resources import SHARED_MEMORY_LIMIT, compile_for, record_launches, resources_of
    from optimum_moeq.kernels.tuning import KernelTuning, kernel_tuning
    from optimum_moeq.nn import MixedBitExperts

    hidden, intermediate, experts, top_k = 4096, 14336, 8, 2
    limit = SHARED_MEMORY_LIMIT[args.arch]
    with torch.device("meta"):  # shapes and dtypes are all a compile needs
        module = MixedBitExperts([2, 3, 4, 8] * 2, hidden, intermediate, 128)
    module.kernel = "triton"
    generator = torch.Generator().manual_seed(0)
    settings = [("decode", 1, {})] + [("decode", 1, {"gemv_kernel": "dp4a", "activation_digits": d}) for d in (1, 2)]
    settings += [("prefill", 2048, {})]
    settings += [("prefill", 2048, {**c, "gemm_block_m_small": c["gemm_block_m"]}) for c in candidates(PREFILL_GRID)]
    rows, seen = [], set()
    for regime, tokens, changes in settings:
        x = torch.randn(tokens, hidden, generator=generator).to(torch.bfloat16)
        index = torch.randint(0, experts, (tokens, top_k), generator=generator)
        with kernel_tuning(**changes):
            launches = record_launches(lambda x=x, index=index: module(x, index, torch.rand(index.shape)))
        for launch in launches:
            c = launch.kwargs
            if "N2" not in c:  # dp4a's activation quantization: no weights
                continue
            dp4a = "DIGITS" in c  # its gate_up computes gate and up; SwiGLU runs after the splits
            gate_up = c["GATE_AND_UP"] if dp4a else c["FUSE_SWIGLU"]
            key = (launch.name, c["N2"], c["HAS_Q1"], gate_up, c.get("BLOCK_M"), c["BLOCK_N"],
                   c["num_warps"], c.get("num_stages"), c.get("DIGITS"))  # fmt: skip
            if key in seen:
                continue
            seen.add(key)
            found = resources_of(compile_for(launch, args.arch), args.arch)
            tiles = f"{c.get('BLOCK_M', 1)}x{c['BLOCK_N']}x{c['BLOCK_K']}, {c['num_warps']} warps"
            tiles += f", {c['num_stages']} stages" if "num_stages" in c else f", split-K {c['SPLIT_K']}"
            # weights one thread decodes per pass of the K loop
            per_thread = c["BLOCK_K"] * c["BLOCK_N"] * (2 if gate_up else 1) / (c["num_warps"] * 32)
            kernel = ("dp4a, " + ("int8" if c["DIGITS"] == 1 else "2 digits")) if dp4a else "float"
            projection = "down" if not gate_up else "gate_up" if dp4a else "gate_up (SiLU fused)"
            rows.append([
                regime, projection, kernel, c["N2"] * 2 + c["HAS_Q1"], tiles,
                "default" if not changes else "candidate", f"{found.shared_bytes / 1024:.0f}", found.registers,
                found.spill_bytes, f"{found.loop_instructions / per_thread:.2f}",
                ", ".join(f"{pipe} {cycles / per_thread:.2f}" for pipe, cycles in found.loop_pipe_cycles.items()
                          if cycles) + f" (bound: {found.pipe_bound()[0]})",
                "yes" if found.shared_bytes <= limit else "**no**",
            ])  # fmt: skip
    notes = (
        f"Compiled for sm_{args.arch} (shared memory limit {limit / 1024:.0f} KiB per block) by Triton's compiler and "
        f"ptxas on a machine without a GPU; no kernel ran. Mixtral-8x7B shapes, group 128, bf16 activations. "
        "Loop instr / weight: SASS instructions of the K loop over the weights one thread decodes per pass. "
        "Loop cycles / weight by pipe: a scheduler's cycles for those instructions per weight of a lane, every "
        "instruction one issue slot, integer ALU ops (LOP3, SHF, IADD3, ...) and IMAD / IDP (FMA-heavy pipe) 2 "
        "cycles, float FMA 1, conversions 8 (sm_90 throughputs of the CUDA C++ Programming Guide; an estimate of "
        "the limit, not a timing). "
        f"Defaults: {KernelTuning()}. Command: python benchmarks/kernel_resources.py"
        f"{'' if args.arch == 90 else f' --arch {args.arch}'}"
    )
    header = ["regime", "projection", "kernel", "bits", "tile (MxNxK), warps", "tuning", "shared KiB", "registers",
              "spill B", "loop instr / weight", "loop cycles / weight by pipe", "fits"]  # fmt: skip
    write_table(args.out, f"Kernel resources on sm_{args.arch}", header, rows, notes)


if __name__ == "__main__":
    main()
