"""Peak memory and time of the default quantize-on-load (streaming GPTQ) on a Mixtral-shaped
checkpoint, against the bound: the packed model + one full-precision layer + the calibration
activations + one expert's float64 Hessian (8 K^2 bytes for the widest input K: GPTQ factors it
in place, with no temporary of its size) + 1 GiB.

    python benchmarks/calibration_memory.py                      # Mixtral-8x7B layers, 4 of 32
    python benchmarks/calibration_memory.py --device cuda        # the walk on a GPU (device_map)
    python benchmarks/calibration_memory.py --hidden 1024 --intermediate 3584   # scaled layers
    python benchmarks/calibration_memory.py --smoke              # tiny: checks the script

With ``--device cuda`` the bound applies to the GPU's peak allocation (the walk's layer,
activations and Hessians live there), and the host's peak RSS is reported beside it.

Each load runs in its own process (peak RSS is the process's own). The checkpoint is random
bf16 with per-expert tensors, as transformers saves Mixtral; calibration is token ids (the
random model has no tokenizer), nsamples x seqlen of them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import PeakWhere, own_peak_rss, results_path, watch_rss, write_table  # noqa: E402

GIB = 2**30


def child(path: str, nsamples: int, seqlen: int, group_size: int, device: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from optimum_moeq import RouterNormConfig, model_footprint

    torch.set_num_threads(os.cpu_count() or 1)
    config = json.load(open(os.path.join(path, "config.json")))
    ids = torch.randint(0, config["vocab_size"], (nsamples, seqlen), generator=torch.Generator().manual_seed(0))
    quantization = RouterNormConfig(avg_bits=2.5, group_size=group_size, dataset=ids, nsamples=nsamples, seqlen=seqlen)
    start = time.perf_counter()
    with PeakWhere() as peak:
        model = AutoModelForCausalLM.from_pretrained(
            path, quantization_config=quantization, dtype=torch.bfloat16, device_map=device
        )
        if device == "cuda":
            torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    assert model.config.quantization_config.method == "gptq" and model.hf_quantizer._streamed == {}
    return {
        "seconds": seconds,
        "peak_rss": own_peak_rss(),
        "peak_gpu": torch.cuda.max_memory_allocated() if device == "cuda" else 0,
        "model_bytes": model_footprint(model).total_bytes,
        "device": torch.cuda.get_device_name() if device == "cuda" else f"{os.cpu_count()} CPU cores",
        "peak_where": peak.where,
        "rss_by_place": sorted(peak.by_place.items(), key=lambda item: -item[1])[:8],
    }


def layer_bytes(path: str) -> int:
    """Bytes of the largest decoder layer in the checkpoint (its own dtype)."""
    from safetensors import safe_open

    sizes = {}
    for name in os.listdir(path):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(path, name), "pt") as f:
                for key in f.keys():
                    if key.startswith("model.layers."):
                        layer = key.split(".")[2]
                        t = f.get_slice(key)
                        numel = 1
                        for d in t.get_shape():
                            numel *= d
                        sizes[layer] = sizes.get(layer, 0) + numel * 2  # bf16
    return max(sizes.values())


def command_as_run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """The command line, with every option that differs from its default."""
    command = "python benchmarks/calibration_memory.py"
    for dest in ("layers", "hidden", "intermediate", "nsamples", "seqlen", "group_size", "device", "smoke"):
        value = getattr(args, dest)
        if value != parser.get_default(dest):
            command += f" --{dest.replace('_', '-')}" + ("" if value is True else f" {value}")
    return command


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int)
    parser.add_argument("--intermediate", type=int)
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="device_map of the load")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.nsamples, args.seqlen, args.group_size, args.device)))
        return
    table = "calibration_memory_gpu.md" if args.device == "cuda" else "calibration_memory.md"
    args.out = args.out or results_path(table, args.smoke)
    from allocation import write_checkpoint

    sizes = {k: v for k, v in (("hidden_size", args.hidden), ("intermediate_size", args.intermediate)) if v}
    nsamples, seqlen = (2, 32) if args.smoke else (args.nsamples, args.seqlen)
    with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(__file__))) as tmp:
        shapes = write_checkpoint(tmp, 2 if args.smoke else args.layers, args.smoke, **sizes)
        with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
            process = subprocess.Popen(
                [sys.executable, __file__, "--child", tmp, "--nsamples", str(nsamples), "--seqlen", str(seqlen),
                 "--group-size", str(32 if args.smoke else args.group_size), "--device", args.device],
                stdout=stdout, stderr=stderr, text=True,
            )  # fmt: skip
            outside = watch_rss(process)
            stdout.seek(0), stderr.seek(0)
            if process.wait() != 0:
                sys.exit(f"the quantize-on-load child failed:\n{stderr.read()[-4000:]}")
            figures = json.loads(stdout.read().strip().splitlines()[-1])
        one_layer = layer_bytes(tmp)
    activations = nsamples * seqlen * shapes["hidden"] * 4 * 4  # layer inputs, outputs and the experts' copies
    gptq = 8 * max(shapes["hidden"], shapes["intermediate"]) ** 2  # one float64 Hessian, factored in place
    bound = figures["model_bytes"] + one_layer + activations + gptq + GIB
    peak = figures["peak_gpu"] if args.device == "cuda" else figures["peak_rss"]
    layers = 2 if args.smoke else args.layers
    rows = [[
        f"{layers} layers, hidden {shapes['hidden']}, intermediate {shapes['intermediate']}", figures["device"],
        f"{peak / GIB:.2f}", f"{figures['peak_rss'] / GIB:.2f}", f"{figures['model_bytes'] / GIB:.2f}",
        f"{one_layer / GIB:.2f}", f"{activations / GIB:.2f}", f"{gptq / GIB:.2f}", f"{bound / GIB:.2f}",
        "yes" if peak <= bound else "NO", f"{figures['seconds'] / layers:.1f}",
    ]]  # fmt: skip
    header = ["checkpoint", "walk on", "peak GiB (walk's device)", "peak host RSS GiB", "packed model GiB",
              "one bf16 layer GiB", "activations GiB", "one Hessian GiB", "bound GiB", "within",
              "s per layer"]  # fmt: skip
    notes = (
        f"Default quantize-on-load (method None -> streaming GPTQ, {nsamples} x {seqlen} calibration tokens), "
        f"device_map={args.device!r}; bound = packed model + one full-precision layer + activations + one "
        "expert's float64 Hessian of the widest input (GPTQ factors it in place) + 1 GiB, against the peak on "
        "the walk's device (GPU: torch.cuda.max_memory_allocated; CPU: the process's "
        "peak RSS). "
        f"`{command_as_run(parser, args)}`"
        + (" Tiny smoke shapes: not the measurement." if args.smoke else "")
        + " Sampled from the parent every 10 ms (no GIL of the child's can hide a peak): "
        f"{outside['rss'] / GIB:.2f} GiB at most, {outside['anon'] / GIB:.2f} anonymous and "
        f"{outside['file'] / GIB:.2f} file-backed (shared libraries, mapped checkpoint pages) at that moment."
        + "\n\nHost RSS peak sampled every 20 ms from inside the child, set in: "
        + " < ".join(f"`{frame}`" for frame in reversed(figures["peak_where"]))
        + ".\n\nHighest sampled RSS by the innermost function running (of optimum_moeq / transformers):\n\n"
        + "\n".join(f"- `{place}`: {rss / GIB:.2f} GiB" for place, rss in figures["rss_by_place"])
    )
    write_table(args.out, "Streaming GPTQ memory", header, rows, notes)


if __name__ == "__main__":
    main()
