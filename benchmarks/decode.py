"""Greedy decode tokens/s: a Mixtral-8x7B-shaped model with packed 2.5-bit experts vs bfloat16.

    python benchmarks/decode.py                      # on a GPU: table to benchmarks/results/decode.md
    python benchmarks/decode.py --layers 12 --eager   # without the compiled static-cache decode
    python benchmarks/decode.py --profile            # also: kernel time shares of a batch-1 decode
    python benchmarks/decode.py --smoke              # CPU, Triton interpreter, tiny model: checks the script

Both models are built directly on the device with random weights (the quantized one directly
in packed form: no download, no full-precision copy of its experts), with the same number of
layers (as many as the bf16 model fits; default 12 of 32). The bytes-per-token limit is the bytes
a batch-1 step must read (non-expert weights, lm_head, top-k experts' packed bytes per layer)
over the measured copy bandwidth. With the static cache (default) on a GPU, generate() compiles the
decode step (torch.compile, mode "reduce-overhead": CUDA graphs) for both models; ``--eager`` turns
that off.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import copy_bandwidth, device_name, results_path, smoke_environment, write_table  # noqa: E402


def mixtral_config(layers: int, smoke: bool):
    from transformers import MixtralConfig

    if smoke:
        return MixtralConfig(
            vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
            num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=256,
        )  # fmt: skip
    return MixtralConfig(num_hidden_layers=layers, max_position_embeddings=4096)  # Mixtral-8x7B shapes


def build_model(config, expert_bits, group_size: int, device: torch.device):
    """Random weights on ``device``; experts packed at ``expert_bits`` (or bf16 when None)."""
    from transformers import MixtralForCausalLM
    from transformers.models.mixtral.modeling_mixtral import MixtralRotaryEmbedding

    from optimum_moeq.nn import MixedBitExperts
    from optimum_moeq.quant.synthetic import random_packed_projection

    torch.set_default_dtype(torch.bfloat16)
    with torch.device("meta"):
        model = MixtralForCausalLM(config)
        if expert_bits is not None:
            for layer in model.model.layers:
                layer.mlp.experts = MixedBitExperts(
                    expert_bits, config.hidden_size, config.intermediate_size, group_size, config.hidden_act
                )
    torch.set_default_dtype(torch.float32)
    model.to_empty(device=device)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dtype == torch.bfloat16:
                param.fill_(1.0) if name.endswith("norm.weight") else param.normal_(0.0, 0.02)
        for layer in model.model.layers:
            experts = layer.mlp.experts
            if isinstance(experts, MixedBitExperts):
                for proj, (n, k) in experts.layout.projections.items():
                    for b, members in experts.layout.members.items():
                        experts.store_packed(
                            proj, random_packed_projection(len(members), n, k, b, group_size, device=device,
                                                           generator=generator),
                        )  # fmt: skip
    model.model.rotary_emb = MixtralRotaryEmbedding(config=config).to(device)
    return model.eval()


def bytes_per_token(model) -> int:
    """Bytes a batch-1 decode step reads: all non-expert weights but the embedding table, and the
    mean top-k experts of each layer."""
    from optimum_moeq.nn import MixedBitExperts

    total = 0
    for name, param in model.named_parameters():
        if ".experts." not in name and "embed_tokens" not in name:
            total += param.numel() * param.element_size()
    top_k = model.config.num_experts_per_tok
    for layer in model.model.layers:
        experts = layer.mlp.experts
        if isinstance(experts, MixedBitExperts):
            layer_bytes = sum(p.numel() * p.element_size() for p in experts.parameters())
        else:
            layer_bytes = experts.gate_up_proj.nbytes + experts.down_proj.nbytes
        total += layer_bytes * top_k // model.config.num_local_experts
    return total


def generate_kwargs(cache: str, eager: bool) -> dict:
    return dict(
        do_sample=False, pad_token_id=0, cache_implementation=cache if cache == "static" else None,
        disable_compile=eager,
    )  # fmt: skip


def decode_tokens_per_s(model, batch: int, new_tokens: int, kwargs: dict, device) -> float:
    vocab = model.config.vocab_size
    prompt = torch.randint(0, vocab, (batch, 16), generator=torch.Generator().manual_seed(batch)).to(device)

    def run(n: int) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        model.generate(prompt, max_new_tokens=n, min_new_tokens=n, **kwargs)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    run(new_tokens)  # warm-up: kernel compilation, graph capture
    elapsed = min(run(new_tokens) for _ in range(2)) - min(run(1) for _ in range(2))  # without the prefill
    return batch * (new_tokens - 1) / elapsed


def profile_decode(model, new_tokens: int, kwargs: dict, compiled: bool, device, out: str) -> None:
    """Where a batch-1 decode step's time goes: device time per kernel (or op, on CPU) over
    ``new_tokens`` steps, and how much of the wall time the device is busy at all."""
    from torch.profiler import ProfilerActivity, profile

    prompt = torch.zeros(1, 16, dtype=torch.long, device=device)
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)  # warm-up
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
        if cuda:
            torch.cuda.synchronize()
    wall_us = (time.perf_counter() - start) * 1e6
    events = [e for e in prof.key_averages() if (e.device_time_total if cuda else e.self_cpu_time_total) > 0]
    if cuda:  # kernels only: device time of CPU-side ops would count each kernel twice
        events = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA] or events
    time_of = (lambda e: e.device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
    events.sort(key=time_of, reverse=True)
    busy_us = sum(time_of(e) for e in events)
    rows = [[e.key[:80], e.count, f"{time_of(e) / 1e3:.2f}", f"{time_of(e) / busy_us:.1%}"] for e in events[:15]]
    notes = (
        f"Device: {device_name(device)}. Packed model, batch 1, {new_tokens} new tokens (prefill included), "
        f"cache {kwargs['cache_implementation'] or 'dynamic'}, compiled {compiled}. Wall {wall_us / 1e3:.1f} ms; "
        f"{'device busy' if cuda else 'CPU ops'} {busy_us / 1e3:.1f} ms "
        f"({busy_us / wall_us:.0%} of wall: the rest is launch overhead and host work). "
        "Command: python benchmarks/decode.py --profile"
    )
    header = ["kernel" if cuda else "op", "calls", "ms", "share of busy time"]
    write_table(out, "Where a decode step's time goes", header, rows, notes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU through the Triton interpreter")
    parser.add_argument("--layers", type=int, default=12, help="layers in both models (Mixtral-8x7B has 32)")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--cache", choices=["dynamic", "static"], default="static")
    parser.add_argument("--eager", action="store_true", help="do not let generate() compile the static-cache decode")
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--profile", action="store_true", help="also profile the packed model's batch-1 decode")
    parser.add_argument(
        "--out", help="table path (default: benchmarks/results/decode.md; --smoke: benchmarks/.smoke/)"
    )
    args = parser.parse_args()
    args.out = args.out or results_path("decode.md", args.smoke)
    smoke_environment(args.smoke)
    device = torch.device("cpu" if args.smoke else "cuda")
    layers, new_tokens = (2, 4) if args.smoke else (args.layers, args.new_tokens)
    group_size = 32 if args.smoke else args.group_size
    config = mixtral_config(layers, args.smoke)
    bandwidth = copy_bandwidth(device)
    batches = [1] if args.smoke else [int(b) for b in args.batches.split(",")]

    kwargs = generate_kwargs(args.cache, args.eager)
    compiled = args.cache == "static" and not args.eager and device.type == "cuda"  # generate()'s own rule
    results = {}
    for label, bits in (("2.5-bit experts", [3, 2] * 4), ("bf16", None)):
        model = build_model(config, bits, group_size, device)
        per_token = bytes_per_token(model)
        for batch in batches:
            results[label, batch] = (decode_tokens_per_s(model, batch, new_tokens, kwargs, device), per_token)
        if args.profile and bits is not None:
            profile_out = os.path.join(os.path.dirname(os.path.abspath(args.out)), "decode_profile.md")
            profile_decode(model, new_tokens, kwargs, compiled, device, profile_out)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()

    rows = []
    for (label, batch), (tok_s, per_token) in results.items():
        limit = bandwidth / per_token  # DRAM bytes/s a copy moves (read + write); a read-only step can move as many
        ratio = tok_s / results["bf16", batch][0]
        rows.append([label, batch, f"{tok_s:.1f}", f"{ratio:.2f}x", f"{per_token / 1e9:.3f}", f"{limit:.0f}",
                     f"{tok_s / limit:.0%}" if batch == 1 else "-"])  # fmt: skip
    notes = (
        f"Device: {device_name(device)}; copy bandwidth {bandwidth / 1e9:.0f} GB/s (bytes read + written by a "
        "device copy: the rate a read-only step can reach). "
        f"{layers} layers of {'tiny smoke' if args.smoke else 'Mixtral-8x7B'} shapes, group {group_size}, "
        f"cache {args.cache}, compiled {compiled}, {new_tokens} new tokens after a 16-token prompt, prefill excluded. "
        f"Command: python benchmarks/decode.py{' --smoke' if args.smoke else f' --layers {layers}'}"
        f"{' --eager' if args.eager else ''}{'' if args.cache == 'static' else ' --cache ' + args.cache}"
    )
    header = ["experts", "batch", "tokens/s", "vs bf16", "GB read / token (batch 1)", "limit tokens/s", "of limit"]
    write_table(args.out, "Greedy decode, Mixtral-8x7B shapes", header, rows, notes)


if __name__ == "__main__":
    main()
