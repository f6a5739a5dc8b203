"""Whose tokens should build each expert's GPTQ Hessian? (``RouterNormConfig(expert_hessian=...)``)

    python benchmarks/expert_hessians.py            # the replication model (trained or reused)
    python benchmarks/expert_hessians.py --smoke    # a few steps: checks the script

On the replication model (``benchmarks/replication.py``: trained here on CPython's documentation
topics, cached in benchmarks/.cache), held-out perplexity after GPTQ with each expert's Hessian
from: the tokens routed to it ("routed"; experts with fewer than ``min_expert_tokens`` take every
token), every token reaching the layer ("all"), or every token weighted by the router's probability
for the expert ("weighted"); rtn for reference. Uniform 2 bits and the combined allocation at 2.5
bits (levels 2, 3), and "routed" with min_expert_tokens so high that every expert takes every token.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import replication as R  # noqa: E402
from common import results_path, write_table  # noqa: E402

from optimum_moeq import RouterNormConfig  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--workdir", default=os.path.join(os.path.dirname(__file__), ".cache", "replication"))
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out")
    args = parser.parse_args()
    args.out = args.out or results_path("expert_hessians.md", args.smoke)
    torch.set_num_threads(os.cpu_count() or 1)
    from transformers import AutoModelForCausalLM

    data = R.corpus()
    split = int(0.9 * data.numel())
    steps = 3 if args.smoke else args.steps
    _, trained = R.train(args.workdir, data[:split], steps, args.smoke)
    windows = R.held_out_windows(data[split:], 8 if args.smoke else 96)
    calibration = R.batches(data[:split], 32, torch.Generator().manual_seed(2))
    fp = R.perplexity(AutoModelForCausalLM.from_pretrained(trained), windows)
    variants = [
        ("rtn", dict(method="rtn")),
        ("gptq routed (min 16 tokens)", dict(method="gptq", expert_hessian="routed", min_expert_tokens=16)),
        (
            "gptq routed, none has enough (= all)",
            dict(method="gptq", expert_hessian="routed", min_expert_tokens=10**9),
        ),
        ("gptq all", dict(method="gptq", expert_hessian="all")),
        ("gptq weighted", dict(method="gptq", expert_hessian="weighted")),
    ]
    budgets = [("uniform 2", dict(avg_bits=2.0, bit_levels=(2, 3))), ("combined 2.5", dict(avg_bits=2.5))]
    rows = []
    for label, options in variants:
        cells = []
        for _, budget in budgets:
            extra = dict(dataset=calibration, nsamples=32, seqlen=R.SEQLEN) if options["method"] == "gptq" else {}
            config = RouterNormConfig(group_size=R.GROUP, **budget, **options, **extra)
            model = AutoModelForCausalLM.from_pretrained(trained, quantization_config=config)
            cells.append(f"{R.perplexity(model, windows):.4f}")
        rows.append([label, *cells])
    notes = (
        f"Held-out perplexity (96 windows of {R.SEQLEN} bytes; full precision {fp:.4f}); group size {R.GROUP}, "
        "32 calibration windows from the training text. `python benchmarks/expert_hessians.py`."
        + (" Smoke run: tiny model, not the measurement." if args.smoke else "")
    )
    write_table(args.out, "Expert Hessians for GPTQ", ["Hessian", *(b for b, _ in budgets)], rows, notes)


if __name__ == "__main__":
    main()
