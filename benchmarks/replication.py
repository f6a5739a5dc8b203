"""The paper's experiment in miniature: which experts should keep more bits?

    python benchmarks/replication.py             # trains (or reuses) the model, then the whole grid
    python benchmarks/replication.py --smoke     # a few steps and a small grid: checks the script

A Mixtral-style MoE (4 layers, hidden 128, 8 experts, top-2, about 3.5M parameters, byte-level)
is trained here from a saved initialisation on real English text available offline: the
documentation topics that ship with CPython (``pydoc_data.topics``, about 465 KB). Held-out
perplexity (bits of the last 10% of the text) is then measured for the full-precision model and
for every allocation at 2.5 and 2.25 average bits with levels (2, 3) and at 2.0 with (1, 2, 3),
each with the rtn, hqq and gptq quantizers:

* uniform 2-bit / uniform 3-bit;
* random: bits by a random order (mean and spread over 5 seeds);
* frequency: more bits to the experts the router uses most (as PMQ-style methods do);
* router (final norm), router (change from init), maxvar, combined (router change + MaxVar).

Also the expected bytes read per token for the experts under the model's real routing. Prints
the table, writes it with a plot to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import results_path, write_table  # noqa: E402

import optimum_moeq  # noqa: E402,F401  (registers the quantizer)
from optimum_moeq import RouterNormConfig, allocate  # noqa: E402

BUDGETS = [(2.5, (2, 3)), (2.25, (2, 3)), (2.0, (1, 2, 3))]
METHODS = ["rtn", "hqq", "gptq"]
GROUP = 64
SEQLEN = 128


def corpus() -> torch.Tensor:
    import pydoc_data.topics

    text = "\n\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


def model_config(smoke: bool):
    from transformers import MixtralConfig

    return MixtralConfig(
        vocab_size=256, hidden_size=64 if smoke else 128, intermediate_size=128 if smoke else 256,
        num_hidden_layers=2 if smoke else 4, num_attention_heads=4, num_key_value_heads=4, num_local_experts=8,
        num_experts_per_tok=2, max_position_embeddings=SEQLEN, router_aux_loss_coef=0.01, output_router_logits=True,
        tie_word_embeddings=False,
    )  # fmt: skip


def batches(data: torch.Tensor, batch: int, generator: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, data.numel() - SEQLEN - 1, (batch,), generator=generator)
    return torch.stack([data[s : s + SEQLEN] for s in starts.tolist()])


def train(workdir: str, train_data: torch.Tensor, steps: int, smoke: bool) -> tuple[str, str]:
    """Save the initialisation and the trained model; reuse them when already there. The smoke
    model has its own initialisation (a smoke run must not replace the full model's reference)."""
    from transformers import MixtralForCausalLM

    init_path = os.path.join(workdir, "init-smoke" if smoke else "init")
    trained_path = os.path.join(workdir, f"trained-{steps}")
    if not os.path.isfile(os.path.join(init_path, "config.json")):
        torch.manual_seed(0)  # the same initialisation the training below starts from
        MixtralForCausalLM(model_config(smoke)).save_pretrained(init_path)
    if os.path.isfile(os.path.join(trained_path, "config.json")):
        return init_path, trained_path
    torch.manual_seed(0)
    model = MixtralForCausalLM(model_config(smoke))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps, pct_start=0.05)
    generator = torch.Generator().manual_seed(1)
    model.train()
    start = time.perf_counter()
    for step in range(steps):
        tokens = batches(train_data, 16, generator)
        loss = model(tokens, labels=tokens).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if step % 100 == 0 or step == steps - 1:
            print(f"step {step}: loss {loss.item():.3f} ({time.perf_counter() - start:.0f} s)", flush=True)
    model.save_pretrained(trained_path)
    return init_path, trained_path


def held_out_windows(data: torch.Tensor, count: int) -> torch.Tensor:
    stride = (data.numel() - SEQLEN) // count
    return torch.stack([data[i * stride : i * stride + SEQLEN] for i in range(count)])


@torch.no_grad()
def perplexity(model, windows: torch.Tensor) -> float:
    model.eval()
    losses = [model(w[None], labels=w[None]).loss.item() for w in windows]
    return math.exp(sum(losses) / len(losses))


@torch.no_grad()
def expert_frequency(model, windows: torch.Tensor) -> dict[str, list[float]]:
    """Share of tokens routed to each expert, per experts module."""
    counts = {}

    def hook(name):
        def record(module, args):
            index = args[1].reshape(-1)
            counts.setdefault(name, torch.zeros(module_experts[name], dtype=torch.long))
            counts[name] += torch.bincount(index, minlength=module_experts[name])[: module_experts[name]]

        return record

    module_experts, hooks = {}, []
    for name, module in model.named_modules():
        if name.endswith("mlp.experts"):
            module_experts[name] = (
                module.gate_up_proj.shape[0] if hasattr(module, "gate_up_proj") else module.num_experts
            )
            hooks.append(module.register_forward_pre_hook(hook(name)))
    for w in windows:
        model(w[None])
    for h in hooks:
        h.remove()
    return {name: (c.float() / windows.numel()).tolist() for name, c in counts.items()}


def order_allocation(orders: dict[str, list[int]], avg_bits: float, levels) -> dict[str, list[int]]:
    from optimum_moeq.allocation import assign_bits

    return {name: assign_bits(order, avg_bits, levels) for name, order in orders.items()}


def expected_bytes_per_token(allocation: dict[str, list[int]], frequency: dict[str, list[float]], config) -> float:
    """Expert bytes read per token: sum over experts of (tokens routed there per token) x bytes."""
    weights = 3 * config.hidden_size * config.intermediate_size
    total = 0.0
    for name, bits in allocation.items():
        for b, share in zip(bits, frequency[name]):
            total += share * (weights * b / 8 + 2 * 2 * weights / GROUP)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--workdir", default=os.path.join(os.path.dirname(__file__), ".cache", "replication"))
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument(
        "--out", help="table path (default: benchmarks/results/replication.md; --smoke: benchmarks/.smoke/)"
    )
    args = parser.parse_args()
    args.out = args.out or results_path("replication.md", args.smoke)
    torch.set_num_threads(os.cpu_count() or 1)
    from transformers import AutoModelForCausalLM

    data = corpus()
    split = int(0.9 * data.numel())
    train_data, test_data = data[:split], data[split:]
    steps = 3 if args.smoke else args.steps
    methods = ["rtn", "hqq"] if args.smoke else METHODS
    budgets = BUDGETS[:1] if args.smoke else BUDGETS
    seeds = 2 if args.smoke else 5
    windows = held_out_windows(test_data, 8 if args.smoke else 96)
    init_path, trained_path = train(args.workdir, train_data, steps, args.smoke)
    calibration = batches(train_data, 32, torch.Generator().manual_seed(2))

    full = AutoModelForCausalLM.from_pretrained(trained_path)
    config = full.config
    fp_ppl = perplexity(full, windows)
    frequency = expert_frequency(full, windows)
    train_frequency = expert_frequency(full, batches(train_data, 16, torch.Generator().manual_seed(3)))
    del full

    def evaluate(allocation: dict[str, list[int]], method: str) -> float:
        extra = dict(dataset=calibration, nsamples=32, seqlen=SEQLEN, min_expert_tokens=16) if method == "gptq" else {}
        average = sum(sum(b) for b in allocation.values()) / sum(len(b) for b in allocation.values())
        levels = sorted({b for bits in allocation.values() for b in bits})
        levels = levels if len(levels) > 1 else [levels[0], levels[0] + 1]
        quantization = RouterNormConfig(
            avg_bits=average, bit_levels=levels, group_size=GROUP, method=method, allocation=allocation, **extra
        )
        model = AutoModelForCausalLM.from_pretrained(trained_path, quantization_config=quantization)
        return perplexity(model, windows)

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
        strategies["frequency (most used first)"] = order_allocation(by_use, avg_bits, levels)
        for label, allocation in strategies.items():
            record(label, budget, allocation, {m: evaluate(allocation, m) for m in methods},
                   expected_bytes_per_token(allocation, frequency, config))  # fmt: skip
        random_ppl = {m: [] for m in methods}
        random_bytes = []
        for seed in range(seeds):
            rng = random.Random(seed)
            orders = {n: rng.sample(range(config.num_local_experts), config.num_local_experts) for n in names}
            allocation = order_allocation(orders, avg_bits, levels)
            for m in methods:
                random_ppl[m].append(evaluate(allocation, m))
            random_bytes.append(expected_bytes_per_token(allocation, frequency, config))
        cells = [f"{statistics.mean(v):.3f} ± {statistics.pstdev(v):.3f}" for v in random_ppl.values()]
        rows.append(
            [budget, f"random (mean ± sd, {seeds} seeds)", *cells, f"{statistics.mean(random_bytes) / 1e3:.1f}"]
        )
        plot.setdefault("random (mean)", {})[budget] = {m: statistics.mean(v) for m, v in random_ppl.items()}

    notes = (
        f"Model: Mixtral-style, {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
        f"{config.num_local_experts} experts, top-2, byte-level, trained {steps} steps of 16x{SEQLEN} bytes "
        "on the first "
        f"90% of CPython's pydoc_data topics ({data.numel():,} bytes); perplexity per byte on {len(windows)} held-out "
        f"windows of the last 10%. Group {GROUP}. Expert kB/token: expected expert bytes read per token (codes, "
        f"scales and zeros) under the routing measured on the held-out text. "
        f"Command: python benchmarks/replication.py{' --smoke' if args.smoke else f' --steps {steps}'}"
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
    axes[0].set_ylabel("held-out perplexity (per byte)")
    axes[-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
