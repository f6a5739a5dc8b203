"""The paper's experiment in miniature: which experts should keep more bits?

    python benchmarks/replication.py             # builds (or reuses) the testbed, then the whole grid
    python benchmarks/replication.py --smoke     # a tiny model and a small grid: checks the script

On the testbed (``benchmarks/testbed.py``: a Mixtral-style MoE trained here on CPython's standard
library sources), held-out perplexity is measured for the full-precision model and for every
allocation at 2.5 and 2.25 average bits with levels (2, 3) and at 2.0 with (1, 2, 3), each with
the rtn, hqq and gptq quantizers (gptq calibrated on held-in text):

* uniform 2-bit / uniform 3-bit;
* random: bits by a random order (mean and spread over 3 seeds);
* frequency: more bits to the experts the router uses most (as PMQ-style methods do);
* router (final norm), router (change from init), maxvar, combined (router change + MaxVar).

Also the expected bytes read per token for the experts under the model's real routing. Prints
the table, writes it with a plot to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import testbed as T  # noqa: E402
from common import results_path, write_table  # noqa: E402

from optimum_moeq import RouterNormConfig, allocate  # noqa: E402

BUDGETS = [(2.5, (2, 3)), (2.25, (2, 3)), (2.0, (1, 2, 3))]
METHODS = ["rtn", "hqq", "gptq"]


def expected_bytes_per_token(allocation: dict[str, list[int]], frequency: dict[str, list[float]], config) -> float:
    """Expert bytes read per token: sum over experts of (tokens routed there per token) x bytes."""
    weights = 3 * config.hidden_size * config.intermediate_size
    total = 0.0
    for name, bits in allocation.items():
        for b, share in zip(bits, frequency[name]):
            total += share * (weights * b / 8 + 2 * 2 * weights / T.GROUP)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=T.STEPS, help="the testbed's training steps")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument(
        "--budgets", type=float, nargs="+", default=[avg for avg, _ in BUDGETS], help="average bits (default: all)"
    )
    parser.add_argument(
        "--out", help="table path (default: benchmarks/results/replication.md; --smoke: benchmarks/.smoke/)"
    )
    args = parser.parse_args()
    args.out = args.out or results_path("replication.md", args.smoke)
    from transformers import AutoModelForCausalLM

    bed = T.build(args.smoke, args.steps)
    init_path, trained_path = bed.init_path, bed.trained_path
    methods = ["rtn", "hqq"] if args.smoke else METHODS
    budgets = BUDGETS[:1] if args.smoke else [(avg, levels) for avg, levels in BUDGETS if avg in args.budgets]
    seeds = 2 if args.smoke else 3
    windows = bed.windows()

    full = AutoModelForCausalLM.from_pretrained(trained_path)
    config = full.config
    fp_ppl = T.perplexity(full, windows)
    frequency = T.expert_frequency(full, windows)
    train_frequency = T.expert_frequency(full, T.batches(bed.train_tokens, 16, torch.Generator().manual_seed(3)))
    del full

    def evaluate(allocation: dict[str, list[int]], method: str) -> float:
        extra = bed.gptq_held_in() if method == "gptq" else dict(method=method)
        average = sum(sum(b) for b in allocation.values()) / sum(len(b) for b in allocation.values())
        levels = sorted({b for bits in allocation.values() for b in bits})
        levels = levels if len(levels) > 1 else [levels[0], levels[0] + 1]
        quantization = RouterNormConfig(avg_bits=average, bit_levels=levels, allocation=allocation, **extra)
        return T.quantized_perplexity(trained_path, quantization, windows)

    rows, plot = [], {}

    def record(label: str, budget: str, allocation_by_method, ppl_by_method, bytes_per_token):
        cells = [f"{ppl_by_method[m]:.3f}" for m in methods]
        rows.append([budget, label, *cells, f"{bytes_per_token / 1e3:.1f}"])
        plot.setdefault(label, {})[budget] = ppl_by_method

    rows.append(["-", "fp32", *[f"{fp_ppl:.3f}"] * len(methods), "-"])
    names = list(frequency)
    for b in (2, 3):
        uniform = {name: [b] * config.num_local_experts for name in names}
        record(f"uniform {b}-bit", f"{b}.0", uniform, {m: evaluate(uniform, m) for m in methods},
               expected_bytes_per_token(uniform, frequency, config))  # fmt: skip

    for avg_bits, levels in budgets:
        budget = f"{avg_bits} {levels}"
        strategies = {}
        rankings = {
            "router (final norm)": ("router", None),
            "router (change from init)": ("router", init_path),
            "maxvar": ("maxvar", None),
            "combined (change + MaxVar)": ("combined", init_path),
        }
        for label, (ranking, reference) in rankings.items():
            cfg = RouterNormConfig(
                method="rtn", avg_bits=avg_bits, bit_levels=levels, ranking=ranking, reference_model=reference
            )
            strategies[label] = allocate(trained_path, cfg, progress=False).bits
        by_use = {n: sorted(range(len(f)), key=lambda e: -f[e]) for n, f in train_frequency.items()}
        strategies["frequency (most used first)"] = T.order_allocation(by_use, avg_bits, levels)
        for label, allocation in strategies.items():
            record(label, budget, allocation, {m: evaluate(allocation, m) for m in methods},
                   expected_bytes_per_token(allocation, frequency, config))  # fmt: skip
        random_ppl = {m: [] for m in methods}
        random_bytes = []
        for seed in range(seeds):
            rng = random.Random(seed)
            orders = {n: rng.sample(range(config.num_local_experts), config.num_local_experts) for n in names}
            allocation = T.order_allocation(orders, avg_bits, levels)
            for m in methods:
                random_ppl[m].append(evaluate(allocation, m))
            random_bytes.append(expected_bytes_per_token(allocation, frequency, config))
        cells = [f"{statistics.mean(v):.3f} ± {statistics.pstdev(v):.3f}" for v in random_ppl.values()]
        rows.append(
            [budget, f"random (mean ± sd, {seeds} seeds)", *cells, f"{statistics.mean(random_bytes) / 1e3:.1f}"]
        )
        plot.setdefault("random (mean)", {})[budget] = {m: statistics.mean(v) for m, v in random_ppl.items()}

    notes = (
        f"{bed.description} Group {T.GROUP}; gptq calibrated on 32 held-in windows. Expert kB/token: expected "
        "expert bytes read per token (codes, scales and zeros) under the routing measured on the held-out text. "
        f"Command: python benchmarks/replication.py{' --smoke' if args.smoke else ''}"
        + ("" if args.smoke or len(budgets) == len(BUDGETS) else f" --budgets {' '.join(str(a) for a, _ in budgets)}")
    )
    header = ["budget (avg, levels)", "allocation", *[f"ppl {m}" for m in methods], "expert kB/token"]
    write_table(args.out, "Replication: allocation strategies at equal average bits", header, rows, notes)
    save_plot(plot, methods, fp_ppl, args.out.replace(".md", ".png"))


def save_plot(plot, methods, fp_ppl, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = [f"{a} {levels}" for a, levels in BUDGETS if any(f"{a} {levels}" in v for v in plot.values())]
    fig, axes = plt.subplots(1, len(methods), figsize=(5 * len(methods), 4), sharey=True)
    for ax, method in zip(axes if len(methods) > 1 else [axes], methods):
        for label, by_budget in plot.items():
            xs = [b for b in budgets if b in by_budget]
            if xs:
                ax.plot(xs, [by_budget[b][method] for b in xs], marker="o", label=label)
        ax.axhline(fp_ppl, color="black", linestyle=":", label="fp32")
        ax.set_title(method)
        ax.set_xlabel("average bits (levels)")
    axes[0].set_ylabel("held-out perplexity (per token)")
    axes[-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
