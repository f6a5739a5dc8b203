"""Cost of the allocation: streaming allocate() vs loading the model and reading its weights.

    python benchmarks/allocation.py                  # Mixtral-8x7B shapes, 4 layers, scaled to 32
    python benchmarks/allocation.py --layers 32      # all layers (about 90 GB of disk)
    python benchmarks/allocation.py --smoke          # tiny shapes: checks the script

Writes a synthetic Mixtral-8x7B-shaped checkpoint (random bf16, one shard per layer), then, each
in a fresh process: (1) reads the bytes of the expert input projections once with plain file
reads, the floor for any method; (2) ``optimum_moeq.allocate``; (3) the paper's way: load the
model with ``from_pretrained`` and compute the same signals from its weights. (1) and (2)
alternate ``--repeats`` times and report the median. Reports time,
time scaled to 32 layers, peak resident memory (with and without memory-mapped file pages).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import own_peak_rss, results_path, write_table  # noqa: E402

MIXTRAL_LAYERS = 32


def write_checkpoint(path: str, layers: int, smoke: bool, **sizes) -> dict:
    """A random Mixtral checkpoint, per-expert tensors as transformers saves them: Mixtral-8x7B
    shapes, tiny ones for ``smoke``, or MixtralConfig's ``sizes``."""
    from safetensors.torch import save_file
    from transformers import MixtralConfig

    if smoke:
        config = MixtralConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                               num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    else:
        config = MixtralConfig(num_hidden_layers=layers, **sizes)  # Mixtral-8x7B shapes unless sizes say
    head_dim = config.head_dim or config.hidden_size // config.num_attention_heads
    h, i, kv = config.hidden_size, config.intermediate_size, config.num_key_value_heads * head_dim
    config.dtype = "bfloat16"
    config.save_pretrained(path)

    def rand(*shape):
        return torch.empty(shape, dtype=torch.bfloat16).normal_(0, 0.02)

    weight_map = {}
    shards = [{
        "model.embed_tokens.weight": rand(config.vocab_size, h),
        "model.norm.weight": torch.ones(h, dtype=torch.bfloat16),
        "lm_head.weight": rand(config.vocab_size, h),
    }]  # fmt: skip
    for layer in range(layers):
        p = f"model.layers.{layer}"
        shard = {f"{p}.self_attn.q_proj.weight": rand(h, h), f"{p}.self_attn.k_proj.weight": rand(kv, h),
                 f"{p}.self_attn.v_proj.weight": rand(kv, h), f"{p}.self_attn.o_proj.weight": rand(h, h),
                 f"{p}.input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
                 f"{p}.post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
                 f"{p}.block_sparse_moe.gate.weight": rand(config.num_local_experts, h)}  # fmt: skip
        for e in range(config.num_local_experts):
            for name, shape in (("w1", (i, h)), ("w3", (i, h)), ("w2", (h, i))):
                shard[f"{p}.block_sparse_moe.experts.{e}.{name}.weight"] = rand(*shape)
        shards.append(shard)
    total = len(shards)
    for n, shard in enumerate(shards):
        name = f"model-{n + 1:05d}-of-{total:05d}.safetensors"
        save_file(shard, os.path.join(path, name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    largest = max(t.numel() * t.element_size() for shard in shards[1:2] for t in shard.values())
    return {"largest_tensor_bytes": largest, "hidden": h, "intermediate": i}


def _input_projection_ranges(path: str):
    """(file, start, end) byte ranges of every router and w1 tensor, from the safetensors headers."""
    with open(os.path.join(path, "model.safetensors.index.json")) as f:
        weight_map = json.load(f)["weight_map"]
    ranges = []
    for shard in sorted(set(weight_map.values())):
        file = os.path.join(path, shard)
        with open(file, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
        for key, info in header.items():
            if key.endswith((".w1.weight", ".gate.weight")):
                start, end = info["data_offsets"]
                ranges.append((file, 8 + size + start, 8 + size + end))
    return ranges


def child(mode: str, path: str) -> dict:
    """One measurement, run in its own process so its peak memory is its own."""
    peak_anon = [0]

    def sample():
        while True:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("RssAnon:"):
                        peak_anon[0] = max(peak_anon[0], int(line.split()[1]) * 1024)
            time.sleep(0.005)

    # imports first: the time is the work, not the start-up of the libraries
    from transformers import AutoModelForCausalLM

    from optimum_moeq import RouterNormConfig, allocate
    from optimum_moeq.allocation import max_neuron_variance, router_norm_change

    threading.Thread(target=sample, daemon=True).start()
    start = time.perf_counter()
    nbytes = 0
    if mode == "read":
        buffer = memoryview(bytearray(16 << 20))
        for file, begin, end in _input_projection_ranges(path):
            with open(file, "rb", buffering=0) as f:
                f.seek(begin)
                remaining = end - begin
                while remaining:
                    got = f.readinto(buffer[: min(remaining, len(buffer))])
                    remaining -= got
                    nbytes += got
    elif mode == "allocate":
        allocation = allocate(path, RouterNormConfig(method="rtn", avg_bits=2.5, group_size=64), progress=False)
        assert allocation.average_bits == 2.5
    else:  # the paper's way: the whole model in memory, then the same signals from its weights
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
        for layer in model.model.layers:
            router_norm_change(layer.mlp.gate.weight.data)
            gate_up = layer.mlp.experts.gate_up_proj.data
            for e in range(gate_up.shape[0]):
                max_neuron_variance(gate_up[e, : gate_up.shape[1] // 2])
    elapsed = time.perf_counter() - start
    return {"seconds": elapsed, "peak_rss": own_peak_rss(), "peak_anon": peak_anon[0], "bytes": nbytes}


def _median_run(runs: list[dict]) -> dict:
    """The run with the median time (peak memory taken as the largest over all runs)."""
    middle = sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2]
    return {**middle, "peak_rss": max(r["peak_rss"] for r in runs), "peak_anon": max(r["peak_anon"] for r in runs),
            "all_seconds": [r["seconds"] for r in runs]}  # fmt: skip


def _pair_ratios(results: dict) -> str:
    ratios = [a / r for r, a in zip(results["read"]["all_seconds"], results["allocate"]["all_seconds"])]
    return ", ".join(f"{x:.2f}x" for x in ratios) + f", median {sorted(ratios)[len(ratios) // 2]:.2f}x"


def _seconds(run: dict) -> str:
    return ", ".join(f"{s:.2f}" for s in run["all_seconds"]) + " s"


def _drop_page_cache() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3, help="alternating read/allocate runs (median)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, 2 layers: checks the script")
    parser.add_argument("--workdir", default=None, help="where to write the synthetic checkpoint (deleted after)")
    parser.add_argument(
        "--out", help="table path (default: benchmarks/results/allocation.md; --smoke: benchmarks/.smoke/)"
    )
    parser.add_argument("--child", nargs=2, metavar=("MODE", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.out = args.out or results_path("allocation.md", args.smoke)
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    layers = 2 if args.smoke else args.layers
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    workdir = tempfile.mkdtemp(dir=args.workdir)
    try:
        path = os.path.join(workdir, "mixtral-synthetic")
        start = time.perf_counter()
        shapes = write_checkpoint(path, layers, args.smoke)
        print(f"wrote {layers} layers in {time.perf_counter() - start:.0f} s to {path}")
        # read and allocate alternate, repeated: a shared disk's speed drifts between runs, and the
        # median of neighbouring runs keeps the ratio honest. Loading the model is run once.
        runs, cold = {"read": [], "allocate": [], "load model": []}, True
        for mode in ["read", "allocate"] * args.repeats + ["load model"]:
            cold = _drop_page_cache() and cold
            run = subprocess.run(
                [sys.executable, __file__, "--child", mode.split()[0], path],
                capture_output=True,
                text=True,
                check=True,
            )
            runs[mode].append(json.loads(run.stdout.strip().splitlines()[-1]))
        results = {mode: _median_run(r) for mode, r in runs.items()}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    scale = MIXTRAL_LAYERS / layers
    read_s = results["read"]["seconds"]
    rows = []
    for mode, r in results.items():
        rows.append([mode, f"{r['seconds']:.2f}", f"{r['seconds'] * scale:.1f}", f"{r['seconds'] / read_s:.2f}x",
                     f"{r['peak_rss'] / 2**30:.2f}", f"{r['peak_anon'] / 2**30:.2f}"])  # fmt: skip
    largest = shapes["largest_tensor_bytes"]
    notes = (
        f"{'Tiny smoke' if args.smoke else 'Mixtral-8x7B'} shapes (hidden {shapes['hidden']}, intermediate "
        f"{shapes['intermediate']}, 8 experts), {layers} layers written; times scaled by {scale:g} to 32 layers. "
        f"Input projections and routers: {results['read']['bytes'] / 2**30:.2f} GiB read. Largest single tensor "
        f"{largest / 2**20:.0f} MiB. Page cache {'dropped before each run' if cold else 'warm (could not drop it)'}. "
        f"{os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}, CUDA {torch.cuda.is_available()}. "
        f"Peak RSS counts memory-mapped file pages; peak anon does not. "
        f"read and allocate: median of {args.repeats} alternating runs each "
        f"(read {_seconds(results['read'])}; allocate {_seconds(results['allocate'])}; allocate / the read "
        f"just before it: {_pair_ratios(results)}). "
        f"Command: python benchmarks/allocation.py{' --smoke' if args.smoke else f' --layers {layers}'}"
    )
    header = ["method", "seconds", "scaled to 32 layers", "vs reading the bytes", "peak RSS GiB", "peak anon GiB"]
    write_table(args.out, "Allocation cost", header, rows, notes)


if __name__ == "__main__":
    main()
