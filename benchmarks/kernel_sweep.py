"""Which launch parameters are fastest on this GPU: a sweep over the Triton kernels' tile sizes.

    python benchmarks/kernel_sweep.py            # on a GPU: table to benchmarks/results/kernel_sweep.md
    python benchmarks/kernel_sweep.py --smoke    # CPU, Triton interpreter, tiny shapes: checks the script

For each batch, the whole experts layer (Mixtral-8x7B shapes, 2.5-bit mix by default) is timed
under the default ``KernelTuning`` and under every candidate of the regime that batch runs in
(GEMV for decode, plus tl.dot with 16-row blocks as an alternative; tl.dot for prefill). The
table gives the best candidate and its gain; apply it with
``optimum_moeq.kernels.tuning.kernel_tuning(**best)`` or make it the default.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from functools import partial

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import device_name, median_ms, results_path, smoke_environment, write_table  # noqa: E402
from expert_kernels import CONFIGS, build_experts  # noqa: E402

# Each candidate compiles once per bit-width and projection (a few seconds each): grids kept to
# a few minutes in all.
DECODE_GRID = {"gemv_block_n": [32, 64, 128], "gemv_warps": [2, 4], "target_programs": [1024, 4096]}
# Prefill re-dequantizes an expert's weights once per block of BLOCK_M rows: taller blocks spend
# less of the time decoding codes, which is what should decide the 2048-token case.
PREFILL_GRID = {
    "gemm_block_m": [16, 32, 64, 128],
    "gemm_block_n": [64, 128],
    "gemm_warps": [4, 8],
    "gemm_stages": [3, 4],
}
# A few tokens can also take the tl.dot kernel with 16-row blocks: each expert's weights are then
# decoded once per block instead of once per (token, expert) pair, which may win from ~8 tokens.
DECODE_VIA_DOT = [{"decode_max_pairs": 1, "gemm_block_m_small": 16, "gemm_block_n": n} for n in (64, 128)]
SMOKE_DECODE_GRID = {"gemv_block_n": [32, 64], "target_programs": [8, 1024]}
SMOKE_PREFILL_GRID = {"gemm_block_m": [16, 32], "gemm_block_n": [32, 64]}


def candidates(grid: dict[str, list[int]]) -> list[dict[str, int]]:
    names = list(grid)
    return [dict(zip(names, values)) for values in itertools.product(*grid.values())]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU through the Triton interpreter")
    parser.add_argument("--batches", default="1,8,64,512,2048")
    parser.add_argument("--config", default="2.5", choices=list(CONFIGS), help="bit configuration")
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument(
        "--out", help="table path (default: benchmarks/results/kernel_sweep.md; --smoke: benchmarks/.smoke/)"
    )
    args = parser.parse_args()
    args.out = args.out or results_path("kernel_sweep.md", args.smoke)
    smoke_environment(args.smoke)  # before the kernels are imported: the interpreter is chosen then
    from optimum_moeq.kernels.tuning import current_tuning, kernel_tuning

    device = torch.device("cpu" if args.smoke else "cuda")
    hidden, intermediate, experts, top_k = (64, 128, 8, 2) if args.smoke else (4096, 14336, 8, 2)
    group_size = 32 if args.smoke else args.group_size
    batches = [1, 40] if args.smoke else [int(b) for b in args.batches.split(",")]
    decode_grid, prefill_grid = (SMOKE_DECODE_GRID, SMOKE_PREFILL_GRID) if args.smoke else (DECODE_GRID, PREFILL_GRID)

    module = build_experts(CONFIGS[args.config], hidden, intermediate, group_size, device)
    generator = torch.Generator().manual_seed(0)
    rows = []
    for batch in batches:
        x = torch.randn(batch, hidden, generator=generator).to(torch.bfloat16).to(device)
        scores = torch.randn(batch, experts, generator=generator)
        top_k_weights, top_k_index = torch.topk(torch.softmax(scores, -1), top_k, dim=-1)
        layer = partial(module, x, top_k_index.to(device), top_k_weights.to(device))
        decode = batch * top_k <= current_tuning().decode_max_pairs
        grid = decode_grid if decode else prefill_grid
        default_ms = median_ms(layer, device)
        timed = []
        tried = candidates(grid) + (DECODE_VIA_DOT if decode else [])
        for changes in tried:
            if not decode:  # one block height whatever the tokens per expert
                changes = {**changes, "gemm_block_m_small": changes["gemm_block_m"]}
            try:  # a tile too big for the device (shared memory, registers) fails only that candidate
                with kernel_tuning(**changes):
                    timed.append((median_ms(layer, device), changes))
            except Exception as error:  # noqa: BLE001
                print(f"batch {batch}: {changes} failed: {type(error).__name__}: {str(error)[:200]}")
        if not timed:
            raise RuntimeError(f"every candidate failed at batch {batch}")
        best_ms, best = min(timed, key=lambda t: t[0])
        shown = ", ".join(f"{k}={v}" for k, v in best.items() if k != "gemm_block_m_small")
        rows.append([args.config, batch, "decode (GEMV)" if decode else "prefill (tl.dot)", f"{default_ms:.3f}",
                     f"{best_ms:.3f}", f"{default_ms / best_ms:.2f}x", f"{len(timed)} of {len(tried)}",
                     shown])  # fmt: skip
    notes = (
        f"Device: {device_name(device)}. Shapes: hidden {hidden}, intermediate {intermediate}, {experts} experts, "
        f"top-{top_k}, group {group_size}, bf16 activations; whole experts layer, median time. Default: "
        f"{current_tuning()}. Command: python benchmarks/kernel_sweep.py{' --smoke' if args.smoke else ''}"
    )
    header = ["bits", "tokens", "regime", "default ms", "best ms", "gain", "candidates", "best parameters"]
    write_table(args.out, "Kernel launch parameters", header, rows, notes)


if __name__ == "__main__":
    main()
