"""CPU speed of the packed experts: batch-1 decode and 512-token prefill of random Mixtral-shaped
models, against dense bf16 / fp32 and every peer library that runs on CPU here, in one run.

    python benchmarks/cpu.py                    # both models (about an hour here, 7 rounds)
    python benchmarks/cpu.py --models small     # hidden 1024, intermediate 3584, 4 layers
    python benchmarks/cpu.py --smoke            # tiny shapes: checks the script, not a figure

Each variant is loaded in turn and timed alternately with dense bf16 (``--rounds`` pairs,
medians), so its ratio comes from the same minutes of a shared, noisy machine. Peers quantize the
experts only (attention and the rest stay bf16, as optimum-moeq's experts-only default): each
expert becomes two ``nn.Linear`` that the peer replaces, run by transformers' own per-expert loop.
Peers are used where installed (``pip install torchao optimum-quanto hqq``; bitsandbytes is a
dependency); the rest are skipped and named. The bytes-per-token limit is the measured copy
bandwidth over the bytes one decode token reads (the active experts at each format's bits per
weight, every other weight in bf16). The experts layer alone (batch 1, 2.5 bits) is put against a
plain copy of the bytes it reads.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import os
import statistics
import sys
import tempfile
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import results_path, write_table  # noqa: E402

MODELS = {
    "small": dict(hidden_size=1024, intermediate_size=3584, num_hidden_layers=4),
    "large": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=8),
    "smoke": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2),
}
PROMPT, NEW_TOKENS, PREFILL = 8, 24, 512


def mixtral_config(shape: dict):
    from transformers import MixtralConfig

    return MixtralConfig(
        vocab_size=2000, num_local_experts=8, num_experts_per_tok=2, num_attention_heads=16,
        num_key_value_heads=4, max_position_embeddings=1024, **shape,
    )  # fmt: skip


class LinearExperts(nn.Module):
    """transformers' experts loop over one ``nn.Linear`` pair per expert, for the peers that
    quantize linears."""

    def __init__(self, experts):
        super().__init__()
        self.num_experts, self.act_fn = experts.num_experts, experts.act_fn
        self.gate_up = nn.ModuleList(_linear(w) for w in experts.gate_up_proj.data)
        self.down = nn.ModuleList(_linear(w) for w in experts.down_proj.data)

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        for expert in torch.unique(top_k_index).tolist():
            if not 0 <= expert < self.num_experts:
                continue
            token, slot = torch.where(top_k_index == expert)
            gate, up = self.gate_up[expert](hidden_states[token]).chunk(2, dim=-1)
            y = self.down[expert](self.act_fn(gate) * up) * top_k_weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out


def _linear(weight: torch.Tensor) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype)
    linear.weight.data.copy_(weight)
    return linear


def _unfused(path: str, replace_linear):
    """The bf16 model with each experts module as linears, each replaced by ``replace_linear``."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    for layer in model.model.layers:
        experts = LinearExperts(layer.mlp.experts)
        for linears in (experts.gate_up, experts.down):
            for i, linear in enumerate(linears):
                linears[i] = replace_linear(linear)
        layer.mlp.experts = experts
    return model


def bnb_nf4(path: str):
    import bitsandbytes as bnb

    def replace(linear):
        q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=False, compute_dtype=torch.bfloat16,
                              quant_type="nf4")  # fmt: skip
        # transformers' default (no double quantization); Params4bit quantizes as it moves to a device
        weight = bnb.nn.Params4bit(
            linear.weight.data, requires_grad=False, quant_type="nf4", compress_statistics=False
        )
        q.weight = weight.to("cpu")
        return q

    return _unfused(path, replace)


def quanto(bits: int):
    def load(path: str):
        from optimum.quanto import freeze, qint2, qint4, quantize

        model = _unfused(path, lambda linear: linear)
        for layer in model.model.layers:
            quantize(layer.mlp.experts, weights={4: qint4, 2: qint2}[bits])
            freeze(layer.mlp.experts)
        return model

    return load


def torchao(bits: int):
    def load(path: str):
        from torchao.quantization import IntxWeightOnlyConfig, quantize_
        from torchao.quantization.granularity import PerGroup

        # torchao 0.18's Int4WeightOnlyConfig packings are CUDA-only (or need mslk); the intx
        # weight-only config is the one that runs on CPU, at either width
        config = IntxWeightOnlyConfig(weight_dtype={4: torch.int4, 2: torch.int2}[bits], granularity=PerGroup(128))
        model = _unfused(path, lambda linear: linear)
        for layer in model.model.layers:
            quantize_(layer.mlp.experts, config)
        return model

    return load


def hqq_library(bits: int):
    def load(path: str):
        from hqq.core.quantize import BaseQuantizeConfig, HQQBackend, HQQLinear

        HQQLinear.set_backend(HQQBackend.PYTORCH)
        config = BaseQuantizeConfig(nbits=bits, group_size=64)
        return _unfused(
            path, lambda linear: HQQLinear(linear, config, compute_dtype=torch.bfloat16, device="cpu", del_orig=True)
        )

    return load


def dense(dtype):
    def load(path: str):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)

    return load


def moeq(avg_bits: float):
    def load(path: str):
        from transformers import AutoModelForCausalLM

        from optimum_moeq import RouterNormConfig

        config = RouterNormConfig(avg_bits=avg_bits, bit_levels=(2, 3), method="rtn")  # speed: any method
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, quantization_config=config)

    return load


# label, loader, bits per expert weight (true for moeq, nominal for peers), module it needs
VARIANTS = [
    ("dense fp32", dense(torch.float32), 32.0, None),
    ("optimum-moeq 2 bits", moeq(2.0), None, None),
    ("optimum-moeq 2.5 bits", moeq(2.5), None, None),
    ("optimum-moeq 3 bits", moeq(3.0), None, None),
    ("bitsandbytes NF4", bnb_nf4, 4.5, "bitsandbytes"),  # blocks of 64, float32 absmax
    ("optimum-quanto int4", quanto(4), 4.25, "optimum.quanto"),
    ("optimum-quanto int2", quanto(2), 2.25, "optimum.quanto"),
    ("torchao int4 weight-only", torchao(4), 4.25, "torchao"),
    ("torchao int2 weight-only", torchao(2), 2.25, "torchao"),
    ("hqq library 4-bit (PyTorch backend)", hqq_library(4), 4.5, "hqq"),
    ("hqq library 2-bit (PyTorch backend)", hqq_library(2), 2.5, "hqq"),
]


def expert_bits(model) -> float:
    from optimum_moeq import MixedBitExperts, model_footprint

    experts = [m for m in model.modules() if isinstance(m, MixedBitExperts)]
    return 8 * model_footprint(model).experts_bytes / sum(m.layout.num_weights for m in experts)


def decode_seconds(model, prompt: torch.Tensor) -> float:
    start = time.perf_counter()
    model.generate(prompt, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    return time.perf_counter() - start


def prefill_seconds(model, ids: torch.Tensor) -> float:
    start = time.perf_counter()
    model(ids, use_cache=False)
    return time.perf_counter() - start


def copy_seconds(nbytes: int, reps: int = 20) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def experts_layer_alone(model) -> tuple[float, float]:
    """(GB/s at which an experts layer reads the packed bytes of its two routed experts at batch 1,
    GB/s a plain copy reads at), medians. The layers take turns with random routing, so the bytes
    come from memory as in decode (a model is larger than the caches), and the copy is of 256 MB."""
    from optimum_moeq import MixedBitExperts

    layers = [m for m in model.modules() if isinstance(m, MixedBitExperts)]
    x = torch.randn(1, layers[0].hidden_dim, dtype=torch.bfloat16)
    weights = torch.tensor([[0.6, 0.4]], dtype=torch.bfloat16)
    generator = torch.Generator().manual_seed(0)
    rates = []
    for step in range(80):
        module = layers[step % len(layers)]
        index = torch.randperm(module.num_experts, generator=generator)[:2][None]
        nbytes = sum(
            module.expert_projection(p, e).nbytes for e in index[0].tolist() for p in module.projection_shapes
        )
        start = time.perf_counter()
        module(x, index, weights)
        rates.append(nbytes / (time.perf_counter() - start))
    return statistics.median(rates[len(layers) :]) / 1e9, (1 << 28) / copy_seconds(1 << 28, reps=5) / 1e9


def experts_seconds(model, prompt: torch.Tensor) -> tuple[float, float]:
    """(seconds of one greedy decode, seconds of it inside the experts layers), timed by hooks: the
    rest (attention, routers, norms, generate's loop) is the same work as in the dense model, so
    it bounds how far faster experts can take the whole model."""
    from optimum_moeq import MixedBitExperts

    inside, started = [0.0], [0.0]

    def before(*_):
        started[0] = time.perf_counter()

    def after(*_):
        inside[0] += time.perf_counter() - started[0]

    hooks = []
    for m in model.modules():
        if isinstance(m, MixedBitExperts):
            hooks += [m.register_forward_pre_hook(before), m.register_forward_hook(after)]
    try:
        total = decode_seconds(model, prompt)
    finally:
        for h in hooks:
            h.remove()
    return total, inside[0]


def bytes_per_token(config, bits: float) -> float:
    """Bytes one decode token reads: the routed experts at ``bits``, every other weight in bf16
    (one embedding row)."""
    h, i, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    kv = config.num_key_value_heads * h // config.num_attention_heads
    attention = h * h * 2 + 2 * h * kv + h * config.num_local_experts
    experts = config.num_experts_per_tok * 3 * h * i
    return layers * (experts * bits / 8 + attention * 2) + config.vocab_size * h * 2


def table_notes(names, rounds, prefill, threads, copy_gbs, alone, shares, command) -> str:
    shapes = "; ".join(
        f"{n}: hidden {MODELS[n]['hidden_size']}, intermediate {MODELS[n]['intermediate_size']}, "
        f"{MODELS[n]['num_hidden_layers']} layers"
        for n in names
    )
    notes = (
        f"Random Mixtral-shaped models ({shapes}; 8 experts, top-2, vocabulary 2000), {threads} threads, "
        f"greedy decode of {NEW_TOKENS} tokens after {PROMPT} at batch 1, prefill of {prefill} tokens. "
        f"Medians of {rounds} runs alternating with dense bf16; decode ratio = tokens/s over dense bf16's, "
        "prefill ratio = seconds over dense bf16's. Bits per expert weight: true for optimum-moeq (codes, "
        "scales and zeros), nominal for the peers. Limit: copy bandwidth "
        f"({copy_gbs / 2:.1f} GB/s read) over the bytes a decode token reads. "
    )
    for name, (experts_ms, rest_ms, dense_ms) in shares.items():
        notes += (
            f"{name}: of optimum-moeq 2.5 bits' {experts_ms + rest_ms:.1f} ms per decode token, the experts layers "
            f"take {experts_ms:.1f} ms and the rest {rest_ms:.1f} ms (attention, routers, norms, generate's loop: "
            f"the dense model's own work), so even free experts would decode at most {dense_ms / rest_ms:.2f}x "
            f"dense bf16 ({dense_ms:.1f} ms per token). "
        )
    if alone:
        notes += (
            f"An experts layer of the {alone[0]} model alone (batch 1, 2.5 bits, layers in turn, random routing) "
            f"reads its routed experts' packed bytes at {alone[1]:.1f} GB/s; a plain copy reads at "
            f"{alone[2]:.1f} GB/s ({100 * alone[1] / alone[2]:.0f}%). "
        )
    return notes + f"Command: {command}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["small", "large"], choices=["small", "large"])
    parser.add_argument("--rounds", type=int, default=7, help="alternating pairs per variant")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", help="table path (default: benchmarks/results/cpu.md; --smoke: .smoke/)")
    args = parser.parse_args()
    out = args.out or results_path("cpu.md", args.smoke)
    from transformers import MixtralForCausalLM

    rows = []
    copy_gbs = 2 * (1 << 28) / copy_seconds(1 << 28, reps=5) / 1e9  # read + write
    threads = torch.get_num_threads()
    alone, experts_s, shares = None, {}, {}
    names = ["smoke"] if args.smoke else args.models
    command = "python benchmarks/cpu.py" + (" --smoke" if args.smoke else "")  # as run, for the table's notes
    if args.models != parser.get_default("models"):
        command += " --models " + " ".join(args.models)
    if args.rounds != parser.get_default("rounds"):
        command += f" --rounds {args.rounds}"
    header = ["model", "variant", "bits/expert weight", "decode tok/s", "vs bf16", "limit tok/s", "prefill s",
              "vs bf16 (time)"]  # fmt: skip
    for name in names:
        config = mixtral_config(MODELS[name])
        prefill = 32 if args.smoke else PREFILL
        rounds = 2 if args.smoke else args.rounds
        with tempfile.TemporaryDirectory() as path, torch.no_grad():
            torch.manual_seed(0)
            MixtralForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
            generator = torch.Generator().manual_seed(1)
            prompt = torch.randint(0, config.vocab_size, (1, PROMPT), generator=generator)
            ids = torch.randint(0, config.vocab_size, (1, prefill), generator=generator)
            reference = dense(torch.bfloat16)(path)
            measured = {"dense bf16": (16.0, [], [])}
            for label, load, bits, needs in VARIANTS:
                if needs and importlib.util.find_spec(needs) is None:
                    print(f"skipped {label}: {needs} is not installed")
                    continue
                try:
                    model = load(path)
                    decode_seconds(model, prompt)  # warm: kernels built, tables made
                except Exception as err:  # a peer that does not run on this CPU: say so, carry on
                    print(f"skipped {label}: {type(err).__name__}: {err}")
                    continue
                bits = bits or expert_bits(model)
                if label == "optimum-moeq 2.5 bits":
                    timed = [experts_seconds(model, prompt) for _ in range(3)]
                    experts_s[name] = (statistics.median(e for _, e in timed),
                                       statistics.median(t - e for t, e in timed))  # fmt: skip
                    if alone is None and not args.smoke:
                        alone = (name, *experts_layer_alone(model))
                pairs = {"dense bf16": ([], []), label: ([], [])}
                for _ in range(rounds):
                    for key, m in (("dense bf16", reference), (label, model)):
                        pairs[key][0].append(decode_seconds(m, prompt))
                        pairs[key][1].append(prefill_seconds(m, ids))
                measured["dense bf16"][1].extend(pairs["dense bf16"][0])
                measured["dense bf16"][2].extend(pairs["dense bf16"][1])
                ratio_decode = statistics.median(pairs["dense bf16"][0]) / statistics.median(pairs[label][0])
                ratio_prefill = statistics.median(pairs[label][1]) / statistics.median(pairs["dense bf16"][1])
                measured[label] = (bits, pairs[label][0], pairs[label][1], ratio_decode, ratio_prefill)
                del model
                gc.collect()
            if name in experts_s:  # ms per token: (experts layers, everything else, dense bf16's whole)
                dense_ms = statistics.median(measured["dense bf16"][1]) * 1e3 / NEW_TOKENS
                shares[name] = (*(1e3 * t / NEW_TOKENS for t in experts_s[name]), dense_ms)
            for label, (bits, decodes, prefills, *ratios) in measured.items():
                limit = copy_gbs / 2 * 1e9 / bytes_per_token(config, bits)
                decode_ratio, prefill_ratio = ratios or (1.0, 1.0)
                tokens_per_s = NEW_TOKENS / statistics.median(decodes)
                rows.append([
                    name, label, f"{bits:.2f}", f"{tokens_per_s:.1f}", f"{decode_ratio:.2f}", f"{limit:.0f}",
                    f"{statistics.median(prefills):.2f}", f"{prefill_ratio:.2f}",
                ])  # fmt: skip
        # written after each model, so that a run stopped during the next one keeps this one's rows
        write_table(out, "CPU: batch-1 decode and prefill", header, rows,
                    table_notes(names, rounds, prefill, threads, copy_gbs, alone, shares, command))  # fmt: skip


if __name__ == "__main__":
    main()
