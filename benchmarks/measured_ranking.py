"""Beyond the paper: does ``ranking="measured"`` beat the paper's combined ranking?

    python benchmarks/measured_ranking.py            # the testbed (built or reused)
    python benchmarks/measured_ranking.py --smoke    # a few steps: checks the script

On the testbed (``benchmarks/testbed.py``), held-out perplexity after GPTQ (the
default weighted Hessians) at equal average bits, with the experts ordered by: measured gain
(calibration output error at the lowest minus the highest level), combined (router-norm change from
the initialisation + MaxVar, the paper's method), maxvar, frequency (most routed first), and random
(mean over 3 seeds). Budgets 2.5 and 2.25 bits with levels (2, 3) and 2.0 with (1, 2, 3).
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

from optimum_moeq import RouterNormConfig  # noqa: E402
from optimum_moeq.allocate import allocate  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=T.STEPS, help="the testbed's training steps")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--budgets", type=float, nargs="+", default=[2.5, 2.25, 2.0], help="average bits to run")
    parser.add_argument("--out")
    args = parser.parse_args()
    args.out = args.out or results_path("measured_ranking.md", args.smoke)
    from transformers import AutoModelForCausalLM

    bed = T.build(args.smoke, args.steps)
    init, trained = bed.init_path, bed.trained_path
    windows = bed.windows()
    full = AutoModelForCausalLM.from_pretrained(trained)
    fp = T.perplexity(full, windows)
    frequency = T.expert_frequency(full, T.batches(bed.train_tokens, 16, torch.Generator().manual_seed(3)))
    experts = full.config.num_local_experts
    gptq = bed.gptq_held_in()

    def ppl(**options) -> float:
        return T.quantized_perplexity(trained, RouterNormConfig(**gptq, **options), windows)

    every = [(2.5, (2, 3)), (2.25, (2, 3)), (2.0, (1, 2, 3))]
    budgets = every[:2] if args.smoke else [(avg, levels) for avg, levels in every if avg in args.budgets]
    rows = []
    for avg, levels in budgets:
        budget = dict(avg_bits=avg, bit_levels=levels)
        combined = allocate(trained, RouterNormConfig(**budget, reference_model=init), progress=False).bits
        maxvar = allocate(trained, RouterNormConfig(**budget, ranking="maxvar"), progress=False).bits
        by_use = {n: sorted(range(experts), key=lambda e: -f[e]) for n, f in frequency.items()}
        randoms = [
            T.order_allocation({n: random.Random(s).sample(range(experts), experts) for n in frequency}, avg, levels)
            for s in range(3)
        ]
        random_ppl = [ppl(**budget, allocation=a) for a in randoms]
        rows.append([
            f"{avg} {levels}", f"{ppl(**budget, ranking='measured'):.4f}", f"{ppl(**budget, allocation=combined):.4f}",
            f"{ppl(**budget, allocation=maxvar):.4f}",
            f"{ppl(**budget, allocation=T.order_allocation(by_use, avg, levels)):.4f}",
            f"{statistics.mean(random_ppl):.4f} ± {statistics.pstdev(random_ppl):.4f}",
        ])  # fmt: skip
    notes = (
        f"{bed.description} Full precision {fp:.4f}; GPTQ with weighted Hessians, group {T.GROUP}, 32 held-in "
        "calibration windows. `python benchmarks/measured_ranking.py`."
        + (" Smoke run: tiny model, not the measurement." if args.smoke else "")
    )
    header = ["budget", "measured", "combined (paper)", "maxvar", "frequency", "random (3 seeds)"]
    write_table(args.out, "Measured ranking against the paper's", header, rows, notes)


if __name__ == "__main__":
    main()
