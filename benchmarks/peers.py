"""optimum-moeq's quantizers against the field's libraries, same weights, same text, in one run.

    python benchmarks/peers.py               # the testbed (built or reused), groups 64 and 128
    python benchmarks/peers.py --groups 128  # the default group only (half the time)
    python benchmarks/peers.py --smoke       # a tiny testbed: checks the script, not a figure

On the testbed (``benchmarks/testbed.py``), only the experts are quantized, at uniform 2 bits and
at 2.5 bits over (2, 3) with the default allocation (the same bits per expert for every library
that can store them): held-out perplexity, lower is better. optimum-moeq quantizes on load;
each peer quantizes every expert weight as an ``nn.Linear`` through its own module, and the
weight it computes with is read back through that module (``module(I)``), so the figure is the
library's own arithmetic. Peers are used where installed (in this environment: ``pip install
hqq optimum-quanto torchao``; bitsandbytes is a dependency); the rest are named as skipped.
GPTQModel builds from source only (no wheel for this CPU) and is skipped unless importable; where
it is (``BUILD_CUDA_EXT=0 pip install --no-build-isolation gptqmodel`` in its own environment, with
setuptools>=77, and the other peers beside it), its GPTQ solver runs in place of ours on the same
calibration walk, Hessians and integer zeros, so the row compares the solvers alone.
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


def gptqmodel_solver(weight, hessian, bits, group_size, *, integer_zero=True, **_):
    """GPTQModel's own GPTQ (asymmetric, its defaults otherwise: act_group_aware ordering, damping
    0.05, static groups off) on weights [E, N, K] given our Hessians [E, K, K], as a stand-in for
    optimum_moeq.quant.gptq.quantize_gptq: the same calibration walk and Hessians, only the solver
    differs. It gets the Hessian as inputs X with X^T X = H; its weights come back dequantized with
    float32 scales, which its own checkpoint format stores as float16, as ours does."""
    from gptqmodel.quantization.config import QuantizeConfig
    from gptqmodel.quantization.gptq import GPTQ

    from optimum_moeq.quant import GroupQuantized

    if weight.dim() == 2:
        q = gptqmodel_solver(weight[None], hessian[None], bits, group_size, integer_zero=integer_zero)
        return GroupQuantized(q.codes[0], q.scale[0], q.zero[0], bits, group_size)
    codes, scales, zeros = [], [], []
    for w, h in zip(weight.float(), hessian):
        linear = nn.Linear(w.shape[1], w.shape[0], bias=False)
        linear.weight.data.copy_(w)
        config = QuantizeConfig(bits=bits, group_size=group_size, sym=False, fallback=None, offload_to_disk=False)
        solver = GPTQ(linear, config)
        solver.quantizer.configure(perchannel=True)
        values, vectors = torch.linalg.eigh(h.double())
        solver.add_batch((values.clamp_min(0).sqrt()[:, None] * vectors.T).float()[None], None)
        dequantized, scale, zero, g_idx, *_ = solver.quantize()
        if not torch.equal(g_idx.cpu().long(), torch.arange(w.shape[1]) // group_size):
            raise NotImplementedError("GPTQModel regrouped the columns (g_idx): not storable in our format")
        scale = scale.float().reshape(w.shape[0], -1)
        zero = zero.float().reshape(w.shape[0], -1)
        steps = dequantized.float().reshape(w.shape[0], -1, group_size) / scale[..., None] + zero[..., None]
        codes.append(steps.round().clamp(0, 2**bits - 1).reshape(w.shape).int())
        scales.append(scale.half())
        zeros.append(zero.half())
    return GroupQuantized(torch.stack(codes), torch.stack(scales), torch.stack(zeros), bits, group_size)


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
    parser.add_argument("--groups", type=int, nargs="+", default=list(GROUPS), help="group sizes (columns) to measure")
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
    groups = (32,) if args.smoke else tuple(args.groups)
    allocations = {}
    for group in groups:
        two_five = allocate(path, RouterNormConfig(avg_bits=2.5, group_size=group, method="rtn"), progress=False).bits
        allocations[group] = {"2-bit": {n: [2] * experts for n in names}, "2.5-bit": two_five}

    columns = [(g, b) for g in groups for b in BUDGETS]
    rows, skipped = [], []

    def ours(label: str, solver=None, **options) -> None:
        """A row of optimum-moeq quantizing on load with ``options``; ``solver`` stands in for
        quantize_gptq (same calibration walk and Hessians)."""
        import optimum_moeq.calibration as calibration

        cells, bits_per_weight, shipped = [], None, calibration.quantize_gptq
        calibration.quantize_gptq = solver or shipped
        try:
            for group, budget in columns:
                extra = bed.gptq_held_in() if options.get("method") == "gptq" else {}
                config = RouterNormConfig(avg_bits=2.5 if budget == "2.5-bit" else 2.0, bit_levels=(2, 3),
                                          group_size=group, allocation=allocations[group][budget],
                                          **{**extra, **options})  # fmt: skip
                model = AutoModelForCausalLM.from_pretrained(path, quantization_config=config)
                if budget == "2-bit" and group == groups[-1]:
                    bits_per_weight = expert_bits(model)
                cells.append(f"{T.perplexity(model.dequantize(), windows):.3f}")
        finally:
            calibration.quantize_gptq = shipped
        rows.append([label, *cells, f"{bits_per_weight:.3f}"])

    def gptq_ordered(order):
        from optimum_moeq.quant.gptq import quantize_gptq

        return lambda *args, **kwargs: quantize_gptq(*args, **{**kwargs, "act_order": order})

    # each method with its default zeros (integer for rtn and gptq, float16 for hqq); then gptq with
    # float16 zeros (what format 2's integer zeros cost), and with GPTQModel's choices one at a time
    ours("optimum-moeq rtn (integer zeros)", method="rtn")
    ours("optimum-moeq hqq (float16 zeros)", method="hqq")
    ours("optimum-moeq gptq (the default: integer zeros, desc_act static groups, damping 0.01)", method="gptq")
    ours("optimum-moeq gptq, float16 zeros", method="gptq", integer_zeros=False)
    ours("optimum-moeq gptq, damping 0.05", method="gptq", damp_percent=0.05)
    ours("optimum-moeq gptq, group-aware order", gptq_ordered("groups"), method="gptq")
    ours("optimum-moeq gptq, group-aware order, damping 0.05", gptq_ordered("groups"), method="gptq",
         damp_percent=0.05)  # fmt: skip
    if importlib.util.find_spec("gptqmodel") is not None:
        import gptqmodel

        label = f"GPTQModel {gptqmodel.__version__} GPTQ solver, asymmetric (its defaults; our Hessians and zeros)"
        ours(label, gptqmodel_solver, method="gptq")
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
        skipped.append(
            "GPTQModel: not importable here (source-only on PyPI: `BUILD_CUDA_EXT=0 pip install --no-build-isolation "
            "gptqmodel` in its own environment, with setuptools>=77, then run this script there)"
        )

    header = ["method", *(f"g{g} {b}" for g, b in columns), f"bits/weight at g{groups[-1]} 2-bit"]
    notes = (
        f"{bed.description} Full precision: {fp:.3f}. Experts only quantized; 2.5-bit: levels (2, 3), the default "
        "(combined) allocation, the same bits per expert for every library. optimum-moeq gptq calibrated on 32 "
        "held-in windows. Bits per weight: true for optimum-moeq (codes, float16 scales and zeros as stored: "
        "integer zeros cost b bits a group, format 2), nominal for the peers (float16 scale and zero per group; "
        "GPTQModel packs b-bit integer zeros: 2.141 at g128 2-bit). For reference, bitsandbytes NF4 (4 bits, every "
        f"expert, blocks of the group size): {', '.join(nf4)}. "
        + (f"Skipped: {'; '.join(skipped)}. " if skipped else "")
        + f"Command: python benchmarks/peers.py{' --smoke' if args.smoke else ''}"
        + ("" if args.smoke or groups == GROUPS else f" --groups {' '.join(map(str, groups))}")
    )
    write_table(out, "Quantizers against the field's libraries (testbed perplexity)", header, rows, notes)


if __name__ == "__main__":
    main()
