"""Packed mixed-bit MoE kernels vs bfloat16 torch doing the same expert work, Mixtral-8x7B shapes.

    python benchmarks/expert_kernels.py                 # on a GPU: table to benchmarks/results/kernels.md
    python benchmarks/expert_kernels.py --smoke         # CPU, Triton interpreter, tiny shapes: checks the script

For each bit configuration and batch: median time of the whole experts layer (gate_up with
SiLU*up, down, top-k combine) through the Triton kernels and through bf16 torch (the faster of
a per-expert cuBLAS loop and torch._grouped_mm), the packed bytes of the experts the batch
touches (codes + scales + zeros) per second and as a fraction of the measured copy bandwidth,
and TFLOP/s.
"""

from __future__ import annotations

import argparse
import os
import sys
from functools import partial

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import copy_bandwidth, device_name, median_ms, results_path, smoke_environment, write_table  # noqa: E402

CONFIGS = {"2": [2] * 8, "3": [3] * 8, "4": [4] * 8, "2.5": [3, 2] * 4}


def build_experts(bits, hidden, intermediate, group_size, device):
    from optimum_moeq.nn import MixedBitExperts
    from optimum_moeq.quant.synthetic import random_packed_projection

    module = MixedBitExperts(bits, hidden, intermediate, group_size)
    generator = torch.Generator().manual_seed(0)
    for proj, (n, k) in module.layout.projections.items():
        for b, members in module.layout.members.items():
            module.store_packed(proj, random_packed_projection(len(members), n, k, b, group_size, generator=generator))
    module.kernel = "triton"
    return module.to(device)


def bf16_experts_forward(gate_up, down, hidden_states, top_k_index, top_k_weights, grouped: bool):
    """The same expert work in bfloat16: tokens sorted by expert, one GEMM per expert or one grouped GEMM."""
    tokens, top_k = top_k_index.shape
    flat = top_k_index.reshape(-1)
    order = torch.argsort(flat)
    x = hidden_states[order // top_k]
    counts = torch.bincount(flat, minlength=gate_up.shape[0])
    if grouped:
        offsets = torch.cumsum(counts, 0).to(torch.int32)
        h = torch._grouped_mm(x, gate_up.transpose(1, 2), offs=offsets)
        gate, up = h.chunk(2, dim=-1)
        y = torch._grouped_mm(torch.nn.functional.silu(gate) * up, down.transpose(1, 2), offs=offsets)
    else:
        y = torch.empty_like(x)
        start = 0
        for e, count in enumerate(counts.tolist()):
            if count:
                gate, up = torch.nn.functional.linear(x[start : start + count], gate_up[e]).chunk(2, dim=-1)
                y[start : start + count] = torch.nn.functional.linear(torch.nn.functional.silu(gate) * up, down[e])
                start += count
    out = torch.empty_like(y)
    out[order] = y
    return (out.view(tokens, top_k, -1) * top_k_weights[..., None].to(y.dtype)).sum(dim=1)


DECODE_VARIANTS = {
    "dp4a int8": {"gemv_kernel": "dp4a", "activation_digits": 1},
    "dp4a 2 digits": {"gemv_kernel": "dp4a", "activation_digits": 2},
    "float": {"gemv_kernel": "float"},
}


def graph_ms(fn, device: torch.device) -> float:
    """Median milliseconds of ``fn`` replayed from a CUDA graph (no host launch cost); on CPU the
    eager timing."""
    if device.type != "cuda":
        return median_ms(fn, device)
    from triton.testing import do_bench_cudagraph

    return do_bench_cudagraph(fn, rep=50, return_mode="median")


def touched_packed_bytes(module, top_k_index) -> int:
    touched = set(top_k_index.unique().tolist())
    total = 0
    for proj in module.layout.projections:
        for b in module.bit_widths:
            per_expert = module.packed(proj, b).nbytes // len(module.members[b])
            total += per_expert * len(touched & set(module.members[b]))
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU through the Triton interpreter")
    parser.add_argument("--batches", default="1,8,64,512,2048")
    parser.add_argument("--configs", default="2,3,4,2.5", help=f"bit configurations among {list(CONFIGS)}")
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument(
        "--out", help="table path (default: benchmarks/results/kernels.md; --smoke: benchmarks/.smoke/)"
    )
    args = parser.parse_args()
    args.out = args.out or results_path("kernels.md", args.smoke)
    smoke_environment(args.smoke)
    from optimum_moeq.kernels.tuning import current_tuning, kernel_tuning  # after the interpreter is chosen

    device = torch.device("cpu" if args.smoke else "cuda")
    hidden, intermediate, experts, top_k = (64, 128, 8, 2) if args.smoke else (4096, 14336, 8, 2)
    group_size = 32 if args.smoke else args.group_size
    batches = [1, 40] if args.smoke else [int(b) for b in args.batches.split(",")]
    bandwidth = copy_bandwidth(device)

    generator = torch.Generator().manual_seed(0)
    gate_up_bf16 = (torch.randn(experts, 2 * intermediate, hidden, generator=generator) * 0.02).to(torch.bfloat16)
    down_bf16 = (torch.randn(experts, hidden, intermediate, generator=generator) * 0.02).to(torch.bfloat16)
    gate_up_bf16, down_bf16 = gate_up_bf16.to(device), down_bf16.to(device)
    can_group = device.type == "cuda" and hasattr(torch, "_grouped_mm")

    rows = []
    for name in args.configs.split(","):
        module = build_experts(CONFIGS[name], hidden, intermediate, group_size, device)
        for batch in batches:
            x = torch.randn(batch, hidden, generator=generator).to(torch.bfloat16).to(device)
            scores = torch.randn(batch, experts, generator=generator)
            top_k_weights, top_k_index = torch.topk(torch.softmax(scores, -1), top_k, dim=-1)
            top_k_index, top_k_weights = top_k_index.to(device), top_k_weights.to(device)
            work = (gate_up_bf16, down_bf16, x, top_k_index, top_k_weights)
            baselines = {"loop": partial(bf16_experts_forward, *work, False)}
            if can_group:
                baselines["grouped_mm"] = partial(bf16_experts_forward, *work, True)
            bf16_ms, bf16_kind = min((median_ms(fn, device), kind) for kind, fn in baselines.items())
            nbytes = touched_packed_bytes(module, top_k_index)
            flops = 2 * batch * top_k * 3 * hidden * intermediate
            decode = batch * top_k <= current_tuning().decode_max_pairs
            for kernel, changes in (DECODE_VARIANTS if decode else {"tl.dot": {}}).items():
                with kernel_tuning(**changes):
                    forward = partial(module, x, top_k_index, top_k_weights)
                    packed_ms = median_ms(forward, device)
                    graph = graph_ms(forward, device)
                best = min(packed_ms, graph)
                rows.append([
                    name, batch, kernel, f"{packed_ms:.3f}", f"{graph:.3f}", f"{bf16_ms:.3f} ({bf16_kind})",
                    f"{bf16_ms / best:.2f}x", f"{nbytes / 1e6:.1f}", f"{nbytes / (best * 1e-3) / 1e9:.0f}",
                    f"{nbytes / (best * 1e-3) / bandwidth:.0%}", f"{flops / (best * 1e-3) / 1e12:.1f}",
                ])  # fmt: skip
    notes = (
        f"Device: {device_name(device)}; measured copy bandwidth {bandwidth / 1e9:.0f} GB/s (read + write). "
        f"Shapes: hidden {hidden}, intermediate {intermediate}, {experts} experts, top-{top_k}, group {group_size}; "
        "random routing. Packed GB/s counts the codes, scales and zeros of the experts the batch touches, read once, "
        "over the better of the two packed timings (the CUDA graph removes the host's launch cost, as a captured "
        "decode step does); speed-up likewise. Decode rows: the dp4a kernel with int8 or two-digit activations, and "
        "the float kernel. "
        f"Command: python benchmarks/expert_kernels.py{' --smoke' if args.smoke else ''}"
    )
    header = [
        "bits",
        "tokens",
        "kernel",
        "packed ms",
        "packed ms (CUDA graph)",
        "bf16 ms",
        "speed-up",
        "packed MB",
        "packed GB/s",
        "of copy BW",
        "TFLOP/s",
    ]
    write_table(args.out, "Mixed-bit MoE kernels vs bf16", header, rows, notes)


if __name__ == "__main__":
    main()
