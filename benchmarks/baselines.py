"""What a user would pick instead: bitsandbytes NF4 against optimum-moeq, bytes against perplexity.

    python benchmarks/baselines.py            # the testbed of benchmarks/testbed.py (built or reused)
    python benchmarks/baselines.py --smoke

On the testbed (see testbed.py), held-out perplexity per token and the true bytes
of all weights for: fp32; bitsandbytes NF4 on every linear (attention, experts, lm_head);
NF4 on the experts only; optimum-moeq at 2.5 and 3.0 average expert bits (rtn, and the default:
gptq on the built-in calibration text), with the
rest in fp32 and with attention_method="bnb_nf4". NF4 weights are produced and dequantized by
bitsandbytes (quantize_4bit / dequantize_4bit, blocks of 64) and their bytes counted as it stores
them (half a byte per weight, a float32 absmax per 64). Table and plot to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import testbed as T  # noqa: E402
from common import results_path, write_table  # noqa: E402

from optimum_moeq import RouterNormConfig, allocate, model_footprint  # noqa: E402


def nf4_round_trip(weight: torch.Tensor) -> torch.Tensor:
    import bitsandbytes.functional as functional

    packed, state = functional.quantize_4bit(weight.float().contiguous(), blocksize=64, quant_type="nf4")
    return functional.dequantize_4bit(packed, state).reshape(weight.shape)


def nf4_bytes(numel: int) -> int:
    return numel // 2 + 4 * -(-numel // 64)


@torch.no_grad()
def nf4_model(path: str, experts_only: bool):
    """The trained model with NF4 weights (dequantized for evaluation) and its true stored bytes."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path)
    quantized = set()
    for name, module in model.named_modules():
        if name.endswith("mlp.experts"):
            for param in (module.gate_up_proj, module.down_proj):
                param.copy_(torch.stack([nf4_round_trip(w) for w in param]))
                quantized.add(id(param))
        elif not experts_only and isinstance(module, torch.nn.Linear):
            module.weight.copy_(nf4_round_trip(module.weight))
            quantized.add(id(module.weight))
    total = sum(
        nf4_bytes(p.numel()) if id(p) in quantized else p.numel() * p.element_size() for p in model.parameters()
    )
    return model, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=T.STEPS, help="the testbed's training steps")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument(
        "--out", help="table path (default: benchmarks/results/baselines.md; --smoke: benchmarks/.smoke/)"
    )
    args = parser.parse_args()
    args.out = args.out or results_path("baselines.md", args.smoke)
    from transformers import AutoModelForCausalLM

    bed = T.build(args.smoke, args.steps)
    trained = bed.trained_path
    windows = bed.windows()

    rows = []
    full = AutoModelForCausalLM.from_pretrained(trained)
    rows.append(("fp32", model_footprint(full).total_bytes, T.perplexity(full, windows)))
    for label, experts_only in (("bnb NF4, every linear", False), ("bnb NF4, experts only", True)):
        model, nbytes = nf4_model(trained, experts_only)
        rows.append((label, nbytes, T.perplexity(model, windows)))
    group = T.GROUP
    for avg_bits in (2.5, 3.0):
        allocation = allocate(
            trained, RouterNormConfig(method="rtn", avg_bits=avg_bits, group_size=group), progress=False
        ).bits
        for method in ("rtn", None):  # None: the default, gptq on the built-in calibration text
            for attention in ("moeq", "bnb_nf4"):
                config = RouterNormConfig(
                    avg_bits=avg_bits,
                    group_size=group,
                    method=method,
                    allocation=allocation,
                    attention_method=attention,
                )
                model = AutoModelForCausalLM.from_pretrained(trained, quantization_config=config)
                nbytes = model_footprint(model).total_bytes
                kept = "fp32" if attention == "moeq" else "NF4"
                label = f"optimum-moeq {avg_bits} bits, {method or 'gptq (default)'}, attention {kept}"
                rows.append((label, nbytes, T.perplexity(model.dequantize(), windows)))

    table = [[label, f"{nbytes / 2**20:.2f}", f"{ppl:.3f}"] for label, nbytes, ppl in rows]
    notes = (
        f"{bed.description} True bytes of all weights, attention, embeddings "
        "and lm_head included (at this size they are a large share). optimum-moeq allocations: combined "
        f"ranking, group {group}. Command: python benchmarks/baselines.py{' --smoke' if args.smoke else ''}"
    )
    write_table(args.out, "bitsandbytes NF4 vs optimum-moeq", ["model", "MiB", "held-out ppl"], table, notes)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, nbytes, ppl in rows:
        ax.scatter(nbytes / 2**20, ppl, label=label)
    ax.set_xlabel("true weight bytes (MiB)")
    ax.set_ylabel("held-out perplexity (per token)")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(args.out.replace(".md", ".png"), dpi=120)


if __name__ == "__main__":
    main()
