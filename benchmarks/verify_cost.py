"""What checking the packed tensors' digests costs, against loading the checkpoint.

    python benchmarks/verify_cost.py            # Mixtral-shaped layers (hidden 4096, 14336), 2 layers
    python benchmarks/verify_cost.py --smoke    # tiny shapes: checks the script

A random Mixtral checkpoint is quantized (rtn, 2.5 bits) and saved once; then, in one run and
alternating, ``from_pretrained`` of the saved folder (the page cache warm, as on a second load)
and ``optimum_moeq.verify_checkpoint`` of it (SHA-256 of every packed tensor, from a memory map).
The ratio decides whether the digests can be checked on every load (the issue's bar: under 10% of
the load time); see the README's reliability section.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from allocation import write_checkpoint  # noqa: E402
from common import results_path, write_table  # noqa: E402


def seconds(fn, reps: int) -> list[float]:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", help="table path (default: benchmarks/results/verify_cost.md; --smoke: .smoke/)")
    args = parser.parse_args()
    args.out = args.out or results_path("verify_cost.md", args.smoke)
    from transformers import AutoModelForCausalLM

    from optimum_moeq import RouterNormConfig, verify_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        write_checkpoint(os.path.join(tmp, "fp"), args.layers, args.smoke)
        config = RouterNormConfig(avg_bits=2.5, method="rtn", group_size=64 if args.smoke else 128)
        model = AutoModelForCausalLM.from_pretrained(os.path.join(tmp, "fp"), quantization_config=config)
        saved = os.path.join(tmp, "q")
        model.save_pretrained(saved)
        del model
        packed = sum(os.path.getsize(os.path.join(saved, f)) for f in os.listdir(saved) if f.endswith(".safetensors"))
        load, verify = [], []
        for _ in range(args.reps):  # alternating, so that noise hits both alike
            load += seconds(lambda: AutoModelForCausalLM.from_pretrained(saved), 1)
            verify += seconds(lambda: verify_checkpoint(saved), 1)
    load_s, verify_s = statistics.median(load), statistics.median(verify)
    rows = [[f"{packed / 2**20:.1f}", f"{load_s:.3f}", f"{verify_s:.3f}", f"{100 * verify_s / load_s:.0f}%",
             f"{packed / verify_s / 2**30:.2f}"]]  # fmt: skip
    notes = (
        f"{args.layers} Mixtral{'' if args.smoke else '-8x7B'}-shaped layers, rtn 2.5 bits; median of {args.reps} "
        f"alternating runs, {os.cpu_count()} CPU threads. Command: python benchmarks/verify_cost.py"
        + (" --smoke (tiny shapes: not the measurement)" if args.smoke else "")
    )
    header = ["checkpoint MiB", "from_pretrained s", "verify s", "verify / load", "verify GiB/s"]
    write_table(args.out, "Cost of verifying the digests", header, rows, notes)


if __name__ == "__main__":
    main()
