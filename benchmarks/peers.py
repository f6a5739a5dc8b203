"""optimum-moeq's quantizers against the field's libraries, same weights, same text, in one run.

    python benchmarks/peers.py            # the testbed (built or reused), groups 64 and 128
    python benchmarks/peers.py --smoke    # a tiny testbed: checks the script, not a figure

On the testbed (``benchmarks/testbed.py``), only the experts are quantized, at uniform 2 bits and
at 2.5 bits over (2, 3) with the default allocation (the same bits per expert for every library
that can store them): held-out perplexity, lower is better. optimum-moeq quantizes on load;
each peer quantizes every expert weight as an ``nn.Linear`` through its own module, and the
weight it computes with is read back through that module (``module(I)``), so the figure is the
library's own arithmetic. Peers are used where installed (in this environment: ``pip install
hqq optimum-quanto torchao``; bitsandbytes is a dependency); the rest are named as skipped.
GPTQModel builds from source only (no wheel for this CPU) and is skipped unless importable.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import testbed as T  # noqa: E402
from common import results_path, write_table  # noqa: E402
from cpu import expert_bits  # noqa: E402

from optimum_moeq import RouterNormConfig, allocate  # noqa: E402

GROUPS = (64, 128)
BUDGETS = ("2-bit", "2.5-bit")


def hqq_library(linear: nn.Linear, bits: int, group: int) -> nn.Module:
    from hqq.core.quantize import BaseQuantizeConfig, HQQBackend, HQQLinear

    HQQLinear.set_backend(HQQBackend.PYTORCH)
    config = BaseQuantizeConfig(nbits=bits, group_size=group, axis=1)
    return HQQLinear(linear, config, compute_dtype=torch.float32, device="cpu", del_orig=False)


def torchao_intx(linear: nn.Linear, bits: int, group: int) -> nn.Module:
    from torchao.quantization import IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerGroup
    from torchao.quantization.quant_primitives import MappingType

    dtype = getattr(torch, f"int{bits}")
    quantize_(linear, IntxWeightOnlyConfig(weight_dtype=dtype, granularity=PerGroup(group),
                                           mapping_type=MappingType.ASYMMETRIC))  # fmt: skip
    return linear


def quanto(linear: nn.Linear, bits: int, group: int) -> nn.Module:
    from optimum.quanto import freeze, qint2, qint4, quantize

    if bits not in (2, 4):
        raise NotImplementedError(f"optimum-quanto has no {bits}-bit integer weights (qint2, qint4 only)")
    if group != 128:
        raise NotImplementedError("optimum-quanto's quantize() groups weights by 128, not by a chosen size")
    holder = nn.Sequential(linear)
    quantize(holder, weights={2: qint2, 4: qint4}[bits])
    freeze(holder)
    return holder


def bnb_nf4(linear: nn.Linear, bits: int, group: int) -> nn.Module:
    import bitsandbytes.functional as F

    if bits != 4:
        raise NotImplementedError("NF4 is 4 bits")
    packed, state = F.quantize_4bit(linear.weight.data, blocksize=group, quant_type="nf4")
    linear.weight.data = F.dequantize_4bit(packed, state).float()  # its CPU matmul dequantizes the same way
    return linear


# label, quantize one linear, bits per weight at (bits, group) as each stores its metadata
PEERS = [
    ("hqq library (Quantizer.quantize, optimize=True, axis=1)", hqq_library, "hqq", lambda b, g: b + 32 / g),
    ("torchao IntxWeightOnly, asymmetric", torchao_intx, "torchao", lambda b, g: b + 32 / g),
    ("optimum-quanto qint2", quanto, "optimum.quanto", lambda b, g: b + 32 / g),
]


def read_back(module: nn.Module, in_features: int) -> torch.Tensor:
    """The weight [N, K] a linear-like module computes with: its outputs on the identity."""
    with torch.no_grad():
        return module(torch.eye(in_features)).T.contiguous()


def peer_model(path: str, quantize_linear, allocation: dict[str, list[int]], group: int):
    """The full-precision model with every expert weight replaced by the peer's quantized one."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path)
    for name, bits in allocation.items():
        experts = model.get_submodule(name)
        for proj in ("gate_up_proj", "down_proj"):
            stacked = getattr(experts, proj).data
            for e, b in enumerate(bits):
                linear = nn.Linear(stacked.shape[2], stacked.shape[1], bias=False)
                linear.weight.data.copy_(stacked[e])
                stacked[e] = read_back(quantize_linear(linear, b, group), stacked.shape[2])
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", help="table path (default: benchmarks/results/peers.md; --smoke: .smoke/)")
    args = parser.parse_args()
    out = args.out or results_path("peers.md", args.smoke)
    from transformers import AutoModelForCausalLM

    bed = T.build(args.smoke)
    windows = bed.windows()
    path = bed.trained_path
    full = AutoModelForCausalLM.from_pretrained(path)
    fp = T.perplexity(full, windows)
    names = [n for n, m in full.named_modules() if n.endswith("mlp.experts")]
    experts = full.config.num_local_experts
    del full
    groups = (32,) if args.smoke else GROUPS
    allocations = {}
    for group in groups:
        two_five = allocate(path, RouterNormConfig(avg_bits=2.5, group_size=group, method="rtn"), progress=False).bits
        allocations[group] = {"2-bit": {n: [2] * experts for n in names}, "2.5-bit": two_five}

    columns = [(g, b) for g in groups for b in BUDGETS]
    rows, skipped = [], []
    # each method with its default zeros (integer for rtn and gptq, float16 for hqq), and gptq with
    # float16 zeros too: what format 2's integer zeros cost or gain at the same codes' bits
    variants = [("rtn", None), ("hqq", None), ("gptq", None), ("gptq", False)]
    for method, integer_zeros in variants:
        cells, bits_per_weight = [], None
        for group, budget in columns:
            extra = bed.gptq_held_in() if method == "gptq" else dict(method=method)
            config = RouterNormConfig(avg_bits=2.5 if budget == "2.5-bit" else 2.0, bit_levels=(2, 3),
                                      group_size=group, allocation=allocations[group][budget],
                                      integer_zeros=integer_zeros, **extra)  # fmt: skip
            model = AutoModelForCausalLM.from_pretrained(path, quantization_config=config)
            if budget == "2-bit" and group == groups[-1]:
                bits_per_weight = expert_bits(model)
            cells.append(f"{T.perplexity(model.dequantize(), windows):.3f}")
        zeros = "float16 zeros" if integer_zeros is False or method == "hqq" else "integer zeros"
        rows.append([f"optimum-moeq {method} ({zeros})", *cells, f"{bits_per_weight:.3f}"])
    for label, quantize_linear, module, nominal in PEERS:
        if importlib.util.find_spec(module) is None:
            skipped.append(f"{label}: {module} is not installed")
            continue
        cells = []
        for group, budget in columns:
            try:
                model = peer_model(path, quantize_linear, allocations[group][budget], group)
                cells.append(f"{T.perplexity(model, windows):.3f}")
            except NotImplementedError as err:
                cells.append("-")
                if f"{label}: {err}" not in skipped:
                    skipped.append(f"{label}: {err}")
        rows.append([label, *cells, f"{nominal(2, groups[-1]):.3f}"])
    nf4 = []
    for group in groups:
        model = peer_model(path, bnb_nf4, {n: [4] * experts for n in names}, group)
        nf4.append(f"g{group}: {T.perplexity(model, windows):.3f}")
    if importlib.util.find_spec("gptqmodel") is None:
        skipped.append("GPTQModel: not importable here (source-only on PyPI; install it in its own environment)")

    header = ["method", *(f"g{g} {b}" for g, b in columns), f"bits/weight at g{groups[-1]} 2-bit"]
    notes = (
        f"{bed.description} Full precision: {fp:.3f}. Experts only quantized; 2.5-bit: levels (2, 3), the default "
        "(combined) allocation, the same bits per expert for every library. optimum-moeq gptq calibrated on 32 "
        "held-in windows. Bits per weight: true for optimum-moeq (codes, float16 scales and zeros as stored: "
        "integer zeros cost b bits a group, format 2), nominal for the peers (float16 scale and zero per group; "
        "GPTQModel packs b-bit integer zeros: 2.141 at g128 2-bit). For reference, bitsandbytes NF4 (4 bits, every expert, "
        f"blocks of the group size): {', '.join(nf4)}. "
        + (f"Skipped: {'; '.join(skipped)}. " if skipped else "")
        + f"Command: python benchmarks/peers.py{' --smoke' if args.smoke else ''}"
    )
    write_table(out, "Quantizers against the field's libraries (testbed perplexity)", header, rows, notes)


if __name__ == "__main__":
    main()
