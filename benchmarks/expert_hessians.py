"""Whose tokens should build each expert's GPTQ Hessian? (``RouterNormConfig(expert_hessian=...)``)

    python benchmarks/expert_hessians.py            # the testbed (built or reused)
    python benchmarks/expert_hessians.py --smoke    # a few steps: checks the script

On the testbed (``benchmarks/testbed.py``: trained here on CPython's standard library sources,
cached outside the repository), held-out perplexity after GPTQ with each expert's Hessian
from: the tokens routed to it ("routed"; experts with fewer than ``min_expert_tokens`` take every
token), every token reaching the layer ("all"), or every token weighted by the router's probability
for the expert ("weighted"); rtn for reference. Uniform 2 bits and the combined allocation at 2.5
bits (levels 2, 3), and "routed" with min_expert_tokens so high that every expert takes every token.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import testbed as T  # noqa: E402
from common import results_path, write_table  # noqa: E402

from optimum_moeq import RouterNormConfig  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=T.STEPS, help="the testbed's training steps")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out")
    args = parser.parse_args()
    args.out = args.out or results_path("expert_hessians.md", args.smoke)
    from transformers import AutoModelForCausalLM

    bed = T.build(args.smoke, args.steps)
    windows = bed.windows()
    fp = T.perplexity(AutoModelForCausalLM.from_pretrained(bed.trained_path), windows)
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
            extra = (
                dict(dataset=bed.calibration(), nsamples=32, seqlen=T.SEQLEN) if options["method"] == "gptq" else {}
            )
            config = RouterNormConfig(**budget, **options, **extra)
            cells.append(f"{T.quantized_perplexity(bed.trained_path, config, windows):.4f}")
        rows.append([label, *cells])
    notes = (
        f"{bed.description} Full precision {fp:.4f}; group {T.GROUP}, 32 held-in calibration windows. "
        "`python benchmarks/expert_hessians.py`."
        + (" Smoke run: tiny model, not the measurement." if args.smoke else "")
    )
    write_table(args.out, "Expert Hessians for GPTQ", ["Hessian", *(b for b, _ in budgets)], rows, notes)


if __name__ == "__main__":
    main()
