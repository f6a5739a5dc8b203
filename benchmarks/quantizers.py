"""Weight error of the per-expert quantizers, and the time to quantize one Mixtral-8x7B layer.

    python benchmarks/quantizers.py            # GPU if there is one, else CPU (layer time scaled)
    python benchmarks/quantizers.py --smoke    # small shapes: checks the script

Error: mean squared error of the dequantized weights relative to rtn's, on Gaussian and
heavy-tailed (Student-t, 4 degrees of freedom) weights. Time: hqq on all 8 experts of one
Mixtral-8x7B layer (gate_up [8, 28672, 4096] and down [8, 4096, 14336], bf16 synthetic weights) at
the 2.5-bit mix; on CPU one expert is timed and the figure multiplied by 8.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import device_name, results_path, write_table  # noqa: E402

from optimum_moeq.quant import dequantize, quantize_weight  # noqa: E402


def weights(kind: str, shape, generator) -> torch.Tensor:
    normal = torch.randn(shape, generator=generator)
    if kind == "gaussian":
        return normal * 0.02
    chi2 = torch.randn((*shape, 4), generator=generator).pow(2).sum(-1)
    return normal / (chi2 / 4).sqrt() * 0.02


def mse(weight, method, bits, group_size) -> float:
    q = quantize_weight(weight, bits, group_size, method)
    return (dequantize(q.codes, q.scale, q.zero) - weight).pow(2).mean().item()


def layer_seconds(device: torch.device, smoke: bool) -> tuple[float, str]:
    from optimum_moeq.nn import MixedBitExperts

    hidden, inter = (256, 512) if smoke else (4096, 14336)
    experts = 1 if device.type == "cpu" else 8  # CPU: one expert, scaled
    module = MixedBitExperts([3, 2] * 4 if experts == 8 else [3], hidden, inter, 128, method="hqq")
    gate_up = torch.empty(experts, 2 * inter, hidden, dtype=torch.bfloat16, device=device).normal_(0, 0.02)
    down = torch.empty(experts, hidden, inter, dtype=torch.bfloat16, device=device).normal_(0, 0.02)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    module.quantize_projection("gate_up_proj", gate_up)
    module.quantize_projection("down_proj", down)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return seconds * (8 // experts), "measured" if experts == 8 else "one expert measured, x8"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument(
        "--out", help="table path (default: benchmarks/results/quantizers.md; --smoke: benchmarks/.smoke/)"
    )
    args = parser.parse_args()
    args.out = args.out or results_path("quantizers.md", args.smoke)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    generator = torch.Generator().manual_seed(0)
    shape = (8, 64, 512) if args.smoke else (8, 512, 4096)
    rows = []
    for kind in ("gaussian", "student_t"):
        weight = weights(kind, shape, generator).to(device)
        for group_size in (64, 128):
            for bits in (1, 2, 3, 4):
                rtn = mse(weight, "rtn", bits, group_size)
                hqq = mse(weight, "hqq", bits, group_size)
                rows.append([kind, group_size, bits, f"{rtn:.3e}", f"{hqq:.3e}", f"{hqq / rtn:.3f}"])
    seconds, how = layer_seconds(device, args.smoke)
    notes = (
        f"Weights {list(shape)} per case. hqq on one {'smoke-sized' if args.smoke else 'Mixtral-8x7B'} layer "
        f"(8 experts, 2.5-bit mix, group 128) on {device_name(device) if device.type == 'cuda' else 'CPU'}: "
        f"{seconds:.1f} s ({how}; {os.cpu_count()} CPU cores). "
        f"Command: python benchmarks/quantizers.py{' --smoke' if args.smoke else ''}"
    )
    header = ["weights", "group", "bits", "rtn MSE", "hqq MSE", "hqq / rtn"]
    write_table(args.out, "Per-expert quantizers: weight error and speed", header, rows, notes)


if __name__ == "__main__":
    main()
