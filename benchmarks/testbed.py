"""The model every quality benchmark measures on, and how sensitive to quantization it is.

    python benchmarks/testbed.py            # builds (or reuses) the testbed, then its sensitivity table
    python benchmarks/testbed.py --smoke    # a tiny model, a few steps: checks the script

A Mixtral-style MoE (4 layers, hidden 256, 8 experts, top-2, about 16M parameters) with a
byte-level BPE tokenizer (4,096 tokens) trained here, on this machine's CPython standard library
sources (every ``.py`` file of the top two levels of ``Lib``, tests and idlelib left out: about
10 MB of code, docstrings and comments). The last 10% of the tokens are held out. Held-in
calibration windows come from the first 90%; the built-in calibration text of the package
(``pydoc_data.topics``, CPython's English documentation) is not part of the training text, so a
default-config load calibrates on text of another domain, as a user calibrating on C4 and
evaluating on WikiText does.

The tokenizer, the initialisation and the trained model are cached outside the repository (in
``$MOEQ_TESTBED_CACHE``, default ``~/.cache/optimum_moeq/testbed``), under a key made of the
corpus (file names and sizes), the model's shape and the training steps; a missing entry is
rebuilt with the same seeds, so every machine with the same Python builds the same model.

The sensitivity table puts the perplexity cost of uniform 2-bit and 3-bit quantization (rtn, hqq,
gptq) next to published figures for real models, and checks the default config (no data given)
against GPTQ calibrated on held-in text.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import math
import os
import sys
import sysconfig
import time
from dataclasses import dataclass
from functools import cached_property

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import results_path, write_table  # noqa: E402

import optimum_moeq  # noqa: E402,F401  (registers the quantizer)
from optimum_moeq import RouterNormConfig  # noqa: E402

GROUP = 128  # the package's default, and the anchors' group
SEQLEN = 256
BATCH = 16
VOCAB = 4096
STEPS = 1200
CACHE = os.environ.get("MOEQ_TESTBED_CACHE") or os.path.join(
    os.path.expanduser("~"), ".cache", "optimum_moeq", "testbed"
)

# Published perplexity (WikiText-2) of real models, full precision and quantized, for comparison.
ANCHORS = [
    ("DeepSeek-MoE-16B (MoEQuant)", 6.50, {"rtn 2-bit": 5e8, "rtn 3-bit": 10.65}),
    ("Llama-2-7B W2/W3 g128 (OmniQuant)", 5.47, {"rtn 2-bit": 4.2e3, "rtn 3-bit": 6.66, "gptq 2-bit": 36.8}),
]


def corpus_files() -> list[str]:
    lib = sysconfig.get_paths()["stdlib"]
    files = sorted(glob.glob(os.path.join(lib, "*.py")) + glob.glob(os.path.join(lib, "*", "*.py")))
    skip = ("test", "idlelib", "site-packages", "lib2to3")
    return [f for f in files if not any(part.startswith(skip) for part in os.path.relpath(f, lib).split(os.sep))]


def corpus_text(files: list[str]) -> str:
    parts = []
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as f:
            parts.append(f.read())
    return "\n\n".join(parts)


def model_config(smoke: bool, vocab: int):
    from transformers import MixtralConfig

    return MixtralConfig(
        vocab_size=vocab, hidden_size=128 if smoke else 256, intermediate_size=128 if smoke else 512,
        num_hidden_layers=2 if smoke else 4, num_attention_heads=4, num_key_value_heads=4, num_local_experts=8,
        num_experts_per_tok=2, max_position_embeddings=SEQLEN, router_aux_loss_coef=0.01, output_router_logits=True,
        tie_word_embeddings=False,
    )  # fmt: skip


def batches(data: torch.Tensor, batch: int, generator: torch.Generator, seqlen: int = SEQLEN) -> torch.Tensor:
    starts = torch.randint(0, data.numel() - seqlen - 1, (batch,), generator=generator)
    return torch.stack([data[s : s + seqlen] for s in starts.tolist()])


@dataclass
class Testbed:
    """Paths of the cached model and the token splits it was trained and is measured on."""

    init_path: str
    trained_path: str
    train_tokens: torch.Tensor
    test_tokens: torch.Tensor
    steps: int
    corpus_bytes: int
    smoke: bool

    def windows(self, count: int | None = None) -> torch.Tensor:
        """Evenly spaced held-out windows (64 by default, 8 for a smoke run)."""
        count = count or (8 if self.smoke else 64)
        stride = (self.test_tokens.numel() - SEQLEN) // count
        return torch.stack([self.test_tokens[i * stride : i * stride + SEQLEN] for i in range(count)])

    def calibration(self, count: int = 32) -> torch.Tensor:
        """Held-in calibration windows from the training tokens."""
        return batches(self.train_tokens, count, torch.Generator().manual_seed(2))

    def gptq_held_in(self, windows: int = 32) -> dict:
        """RouterNormConfig options for GPTQ calibrated on ``windows`` held-in windows."""
        return dict(method="gptq", dataset=self.calibration(windows), nsamples=windows, seqlen=SEQLEN)

    @cached_property
    def description(self) -> str:
        config = model_config(self.smoke, VOCAB)
        return (
            f"Testbed (benchmarks/testbed.py): Mixtral-style, {config.num_hidden_layers} layers, hidden "
            f"{config.hidden_size}, {config.num_local_experts} experts, top-2, BPE vocabulary {VOCAB}, trained "
            f"{self.steps} steps of {BATCH}x{SEQLEN} tokens on CPython's standard library sources "
            f"({self.corpus_bytes / 1e6:.1f} MB); perplexity per token on held-out windows of the last 10%."
        )


def _key(files: list[str], smoke: bool, steps: int) -> str:
    lib = sysconfig.get_paths()["stdlib"]
    listing = [(os.path.relpath(f, lib), os.path.getsize(f)) for f in files]
    config = model_config(smoke, VOCAB).to_dict()
    blob = json.dumps([listing, config, steps, BATCH, SEQLEN, VOCAB], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _tokenizer(folder: str, text: str):
    """A byte-level BPE tokenizer trained on the corpus (deterministic), saved with the model."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    if not os.path.isfile(os.path.join(folder, "tokenizer.json")):
        bpe = ByteLevelBPETokenizer()
        bpe.train_from_iterator(
            text.split("\n\n"), vocab_size=VOCAB, min_frequency=2, special_tokens=["<|endoftext|>"],
            show_progress=False,
        )  # fmt: skip
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>")
        tokenizer.save_pretrained(folder)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def _tokens(folder: str, text: str, tokenizer) -> torch.Tensor:
    path = os.path.join(folder, "tokens.pt")
    if not os.path.isfile(path):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        torch.save(torch.tensor(ids, dtype=torch.int32), path)
    return torch.load(path).long()


def _train(init_path: str, trained_path: str, tokenizer, train_tokens: torch.Tensor, steps: int, smoke: bool):
    from transformers import MixtralForCausalLM

    config = model_config(smoke, VOCAB)
    if not os.path.isfile(os.path.join(init_path, "config.json")):
        torch.manual_seed(0)  # the same initialisation the training below starts from
        MixtralForCausalLM(config).save_pretrained(init_path)
        tokenizer.save_pretrained(init_path)
    if os.path.isfile(os.path.join(trained_path, "config.json")):
        return
    torch.manual_seed(0)
    model = MixtralForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps, pct_start=0.05)
    generator = torch.Generator().manual_seed(1)
    model.train()
    start = time.perf_counter()
    for step in range(steps):
        tokens = batches(train_tokens, BATCH, generator)
        loss = model(tokens, labels=tokens).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if step % 50 == 0 or step == steps - 1:
            print(f"step {step}: loss {loss.item():.3f} ({time.perf_counter() - start:.0f} s)", flush=True)
    partial = trained_path + ".partial"
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    os.replace(partial, trained_path)  # an interrupted run leaves no entry that looks complete


def build(smoke: bool = False, steps: int | None = None) -> Testbed:
    """The cached testbed, built when missing (a smoke build: tiny model, 3 steps, a slice of the corpus)."""
    torch.set_num_threads(os.cpu_count() or 1)
    files = corpus_files()
    if smoke:
        files = files[:20]
    steps = 3 if smoke else (steps or STEPS)
    folder = os.path.join(CACHE, ("smoke-" if smoke else "") + _key(files, smoke, steps))
    os.makedirs(folder, exist_ok=True)
    text = corpus_text(files)
    tokenizer = _tokenizer(os.path.join(folder, "tokenizer"), text)
    tokens = _tokens(folder, text, tokenizer)
    split = int(0.9 * tokens.numel())
    init_path, trained_path = os.path.join(folder, "init"), os.path.join(folder, "trained")
    _train(init_path, trained_path, tokenizer, tokens[:split], steps, smoke)
    return Testbed(init_path, trained_path, tokens[:split], tokens[split:], steps, len(text.encode()), smoke)


@torch.no_grad()
def perplexity(model, windows: torch.Tensor) -> float:
    model.eval()
    losses = [model(w[None], labels=w[None]).loss.item() for w in windows]
    return math.exp(sum(losses) / len(losses))


def quantized_perplexity(path: str, config, windows: torch.Tensor) -> float:
    """Perplexity of the model quantized on load with ``config``, measured on its dequantized
    weights (``model.dequantize()``: the stored codes exactly, through dense matmuls; the packed
    kernels are tested equal to that reference and are slower on CPU)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=config)
    return perplexity(model.dequantize(), windows)


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
    """Bits per expert from an order (most deserving first), at the average bits of the budget."""
    from optimum_moeq.allocation import assign_bits

    return {name: assign_bits(order, avg_bits, levels) for name, order in orders.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", help="table path (default: benchmarks/results/testbed.md; --smoke: .smoke/)")
    args = parser.parse_args()
    args.out = args.out or results_path("testbed.md", args.smoke)
    from transformers import AutoModelForCausalLM

    bed = build(args.smoke, args.steps)
    windows = bed.windows()
    fp = perplexity(AutoModelForCausalLM.from_pretrained(bed.trained_path), windows)

    def ppl(**options) -> float:
        return quantized_perplexity(bed.trained_path, RouterNormConfig(**options), windows)

    def cost(value: float, reference: float) -> str:
        return f"{value:.2f} ({100 * (value / reference - 1):+.1f}%)" if value < 1e4 else f"{value:.1e}"

    rows, columns = [], ["rtn 2-bit", "hqq 2-bit", "gptq 2-bit", "rtn 3-bit", "hqq 3-bit", "gptq 3-bit"]
    for label, every_linear in (("this testbed, experts", False), ("this testbed, every linear", True)):
        measured = {}
        for column in columns:
            method, bits = column.split()[0], int(column.split()[1][0])
            uniform = dict(
                avg_bits=float(bits), bit_levels=(bits, bits + 1), attention_bits=bits if every_linear else None
            )
            options = bed.gptq_held_in() if method == "gptq" else dict(method=method)
            measured[column] = ppl(**uniform, **options)
        rows.append([label, f"{fp:.2f}", *(cost(measured[c], fp) for c in columns)])
    for label, reference, figures in ANCHORS:
        cells = [cost(figures[c], reference) if c in figures else "-" for c in columns]
        rows.append([label, f"{reference:.2f}", *cells])
    write_table(
        args.out, "Testbed sensitivity: uniform quantization against real models", ["model", "fp", *columns], rows,
        f"{bed.description} Uniform widths over every expert (and, in the second row, every attention linear too, "
        f"as the anchors quantize every linear), group {GROUP} as the anchors; gptq calibrated on 32 held-in "
        "windows. Anchors are published WikiText-2 figures. "
        f"Command: python benchmarks/testbed.py{' --smoke' if args.smoke else ''}",
    )  # fmt: skip

    rtn = ppl(avg_bits=2.5, method="rtn")
    held_in = ppl(avg_bits=2.5, **bed.gptq_held_in(128))  # as many windows as the default takes
    default = ppl(avg_bits=2.5)
    in_order = ppl(avg_bits=2.5, desc_act=False)  # what desc_act (on by default) earns

    def against_targets(value: float) -> str:
        recovered = (rtn - value) / (rtn - fp) if rtn > fp else float("nan")
        return f"{100 * (value / held_in - 1):+.2f}% vs held-in; {100 * recovered:.0f}% of rtn's cost recovered"

    target_rows = [
        ["rtn (method='rtn')", f"{rtn:.3f}", "-"],
        ["gptq on held-in text (128 windows)", f"{held_in:.3f}", "-"],
        ["default (no data: gptq on 128 windows of the built-in text)", f"{default:.3f}", against_targets(default)],
        ["default with desc_act=False (columns in order)", f"{in_order:.3f}", against_targets(in_order)],
    ]  # fmt: skip
    write_table(
        args.out.replace(".md", "_default.md"), "The default config at 2.5 bits", ["config", "ppl", "target"],
        target_rows, f"Combined ranking, levels (2, 3), group {GROUP}. Targets: within 0.5% of held-in GPTQ, at least "
        "half of rtn's cost recovered. " + f"Command: python benchmarks/testbed.py{' --smoke' if args.smoke else ''}",
    )  # fmt: skip


if __name__ == "__main__":
    main()
