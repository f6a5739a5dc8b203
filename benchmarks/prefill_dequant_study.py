"""Where the prefill GEMM's instructions go, and what moving the dequantization would save: an
offline study on sm_90 (no GPU needed) behind issue 16's "prefill dequantization at most 1.5
instructions per weight".

    python benchmarks/prefill_dequant_study.py     # table to benchmarks/results/prefill_dequant_study.md

A stripped-down prefill tile (one 2-bit expert, Mixtral gate shape K=4096, N=14336, group 128,
bf16 activations) is compiled in several variants; each row gives the K loop's SASS instructions
per weight a thread dequantizes, its shared-memory stores per weight and the most frequent opcodes.
The shipped kernel (``triton_moe._moe_gemm_kernel``) is the first variant plus its masks and the
per-width expert lookup. No variant ran: these are compile-time counts, not timings.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)  # compiled kernels, not interpreted
import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import results_path, write_table  # noqa: E402

VARIANTS = {
    0: "weights as the B operand (shared memory), float32 unit floats, scale and zero per weight: the shipped scheme",
    1: "weights as the A operand (x^T as B): same arithmetic",
    2: "A operand, bf16 codes by the magic number 0x4300, no scale or zero (a floor for this extraction)",
    3: "codes (128 + c) as bf16 times x^T, scale and zero applied to the accumulator per group",
}


@triton.jit
def _tile(x_ptr, out_ptr, q_ptr, s_ptr, z_ptr, xsum_ptr, K, N, stride_x, stride_q, stride_o,
          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, VARIANT: tl.constexpr):  # fmt: skip
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    WORDS: tl.constexpr = BLOCK_K // 16
    row_in_word = tl.arange(0, 16)
    if VARIANT == 0:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        word_rows = k0 // 16 + tl.arange(0, WORDS)
        s = tl.load(s_ptr + (k0 // BLOCK_K) * N + offs_n).to(tl.float32)
        z = tl.load(z_ptr + (k0 // BLOCK_K) * N + offs_n).to(tl.float32)
        if VARIANT == 0:
            x = tl.load(x_ptr + offs_m[:, None] * stride_x + k0 + tl.arange(0, BLOCK_K)[None, :])
            words = tl.load(q_ptr + word_rows[:, None] * stride_q + offs_n[None, :])
            codes = tl.reshape((words[:, None, :] >> (2 * row_in_word)[None, :, None]) & 3, (BLOCK_K, BLOCK_N))
            w = ((codes << 21) | 0x3F800000).to(tl.float32, bitcast=True) * (4.0 * s)[None, :]
            acc += tl.dot(x, (w - ((4.0 + z) * s)[None, :]).to(tl.bfloat16))
        else:
            xt = tl.load(x_ptr + offs_m[None, :] * stride_x + k0 + tl.arange(0, BLOCK_K)[:, None])
            words = tl.load(q_ptr + word_rows[None, :] * stride_q + offs_n[:, None])  # [BLOCK_N, WORDS]
            codes = tl.reshape((words[:, :, None] >> (2 * row_in_word)[None, None, :]) & 3, (BLOCK_N, BLOCK_K))
            if VARIANT == 1:
                w = ((codes << 21) | 0x3F800000).to(tl.float32, bitcast=True) * (4.0 * s)[:, None]
                acc += tl.dot((w - ((4.0 + z) * s)[:, None]).to(tl.bfloat16), xt)
            elif VARIANT == 2:
                acc += tl.dot((codes | 0x4300).to(tl.int16).to(tl.bfloat16, bitcast=True), xt)
            else:  # 128 + c in the dot; s (sum (128 + c) x - (128 + z) sum x) on the accumulator
                d = tl.dot((codes | 0x4300).to(tl.int16).to(tl.bfloat16, bitcast=True), xt)
                xs = tl.load(xsum_ptr + offs_m * (K // BLOCK_K) + k0 // BLOCK_K)
                acc += s[:, None] * d - ((128.0 + z) * s)[:, None] * xs[None, :]
    if VARIANT == 0:
        tl.store(out_ptr + offs_m[:, None] * stride_o + offs_n[None, :], acc)
    else:
        tl.store(out_ptr + offs_m[None, :] * stride_o + offs_n[:, None], acc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="table path (default: benchmarks/results/prefill_dequant_study.md)")
    args = parser.parse_args()
    from optimum_moeq.kernels.resources import Launch, _loop_opcodes, compile_for, resources_of

    K, N, T, group, block_n, warps = 4096, 14336, 2048, 128, 64, 4
    x = torch.empty(T, K, dtype=torch.bfloat16)
    out = torch.empty(T, N, dtype=torch.float32)
    q = torch.empty(K // 16, N, dtype=torch.int32)
    meta = torch.empty(K // group, N, dtype=torch.float16)
    xsum = torch.empty(T, K // group, dtype=torch.float32)
    rows = []
    for variant, what in VARIANTS.items():
        for block_m in (64, 128):
            options = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=group, VARIANT=variant, num_warps=warps,
                           num_stages=3, enable_fp_fusion=True)  # fmt: skip
            launch = Launch(_tile, (x, out, q, meta, meta, xsum, K, N, K, N, N), options)
            compiled = compile_for(launch)
            found = resources_of(compiled)
            opcodes = collections.Counter(_loop_opcodes(compiled.asm["cubin"]))
            per_thread = group * block_n / (warps * 32)
            top = ", ".join(f"{op} {n / per_thread:.2f}" for op, n in opcodes.most_common(6))
            rows.append([variant, what, f"{block_m}x{block_n}x{group}", found.registers, found.spill_bytes,
                         f"{found.shared_bytes / 1024:.0f}", f"{found.loop_instructions / per_thread:.2f}",
                         f"{opcodes['STS'] / per_thread:.2f}", top])  # fmt: skip
    notes = (
        "Compiled for sm_90a by Triton's compiler and ptxas on a machine without a GPU (no kernel ran). One 2-bit "
        "expert, K=4096, N=14336, group 128, bf16 activations, 4 warps, 3 stages. Per weight: SASS instructions of "
        "the K loop over the weights one thread dequantizes per pass (64x128 / 128 threads = 64). STS: stores of "
        "the dequantized tile to shared memory, which wgmma needs for its B operand. Triton chooses where each "
        "operand lives; none of these variants lets the code pick the register pairs wgmma's A fragment holds, "
        "which a per-thread shift of each word (one SHF per 4 weights) and a LOP3 per bf16 pair would need. "
        "Command: python benchmarks/prefill_dequant_study.py"
    )
    header = ["variant", "scheme", "tile (MxNxK)", "registers", "spill B", "shared KiB", "loop instr / weight",
              "STS / weight", "most frequent opcodes / weight"]  # fmt: skip
    write_table(args.out or results_path("prefill_dequant_study.md", False), "Prefill dequantization on sm_90: "
                "variants compiled offline", header, rows, notes)  # fmt: skip


if __name__ == "__main__":
    main()
