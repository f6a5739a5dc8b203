"""vLLM on CPU: a Mixtral-shaped model served as optimum-moeq 2.5 bits against the same model in
bf16, at batch 1 and with 16 requests at once, measured side by side in one run.

    python benchmarks/vllm_serve.py              # small model (cpu.py's), 3 rounds
    python benchmarks/vllm_serve.py --smoke      # tiny: checks the script

The engine runs in the vLLM environment of tests/vllm_env.sh (``.venv-vllm``, or the python in
$MOEQ_VLLM_PYTHON): vLLM pins its own transformers. Both engines are up at once and the rounds
alternate between them; generation is greedy with random token-id prompts (the random model has
no tokenizer), every request generating NEW_TOKENS tokens (end of sequence ignored). Table:
benchmarks/results/vllm_serve.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import results_path, write_table  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT, NEW_TOKENS, CONCURRENT = 16, 64, 16


def engine_child(paths: dict[str, str], rounds: int, new_tokens: int) -> dict:
    """In the vLLM environment: seconds of each (variant, batch) generation, per round."""
    import random

    from vllm import LLM, SamplingParams

    engines = {
        name: LLM(path, skip_tokenizer_init=True, dtype="bfloat16", max_model_len=256, enforce_eager=True,
                  max_num_seqs=CONCURRENT, gpu_memory_utilization=0.15)
        for name, path in paths.items()
    }  # fmt: skip
    generator = random.Random(0)
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True, detokenize=False)
    seconds = {name: {1: [], CONCURRENT: []} for name in engines}
    for _ in range(rounds + 1):  # the first round warms up
        for name, llm in engines.items():
            for batch in (1, CONCURRENT):
                prompts = [{"prompt_token_ids": [generator.randrange(3, 1000) for _ in range(PROMPT)]}
                           for _ in range(batch)]  # fmt: skip
                start = time.perf_counter()
                outputs = llm.generate(prompts, params, use_tqdm=False)
                seconds[name][batch].append(time.perf_counter() - start)
                assert all(len(o.outputs[0].token_ids) == new_tokens for o in outputs)
    return {name: {batch: times[1:] for batch, times in by_batch.items()} for name, by_batch in seconds.items()}


def vllm_python() -> str:
    python = os.environ.get("MOEQ_VLLM_PYTHON") or os.path.join(ROOT, ".venv-vllm", "bin", "python")
    if not os.path.isfile(python):
        sys.exit(f"no vLLM environment at {python}: run `bash tests/vllm_env.sh` first.")
    return python


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    new_tokens = 8 if args.smoke else NEW_TOKENS
    if args.child:
        print("MOEQ_RESULT " + json.dumps(engine_child(json.loads(args.child), args.rounds, new_tokens)), flush=True)
        return
    import torch
    from cpu import MODELS, mixtral_config
    from transformers import AutoModelForCausalLM, MixtralForCausalLM

    from optimum_moeq import RouterNormConfig

    shape = MODELS["smoke" if args.smoke else "small"]
    rounds = 1 if args.smoke else args.rounds
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"dense bf16": os.path.join(tmp, "dense"), "optimum-moeq 2.5 bits": os.path.join(tmp, "moeq")}
        torch.manual_seed(0)
        config = mixtral_config(shape)
        if args.smoke:  # vLLM's CPU attention needs a head size of 32 or more
            config.num_attention_heads, config.num_key_value_heads, config.head_dim = 4, 2, shape["hidden_size"] // 4
        MixtralForCausalLM(config).to(torch.bfloat16).save_pretrained(paths["dense bf16"])
        quantization = RouterNormConfig(avg_bits=2.5, bit_levels=(2, 3), method="rtn")  # speed: any method
        AutoModelForCausalLM.from_pretrained(
            paths["dense bf16"], quantization_config=quantization, dtype=torch.bfloat16
        ).save_pretrained(paths["optimum-moeq 2.5 bits"])
        command = [vllm_python(), os.path.abspath(__file__), "--child", json.dumps(paths), "--rounds", str(rounds)]
        command += ["--smoke"] if args.smoke else []
        run = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TRITON_INTERPRET": "0"})
        if run.returncode:
            sys.exit(f"the vLLM run failed (vLLM logs to stdout):\n{run.stdout[-4000:]}\n{run.stderr[-2000:]}")
        (line,) = [line for line in run.stdout.splitlines() if line.startswith("MOEQ_RESULT ")]
        seconds = json.loads(line.removeprefix("MOEQ_RESULT "))
    rows, rate = [], {}
    for name, by_batch in seconds.items():
        for batch, times in by_batch.items():
            rate[name, batch] = int(batch) * new_tokens / statistics.median(times)
    for name, by_batch in seconds.items():
        for batch in by_batch:
            tokens_per_s = rate[name, batch]
            rows.append([name, batch, f"{tokens_per_s:.1f}", f"{tokens_per_s / rate['dense bf16', batch]:.2f}"])
    command = "python benchmarks/vllm_serve.py" + (" --smoke" if args.smoke else "")
    if args.rounds != parser.get_default("rounds"):
        command += f" --rounds {args.rounds}"
    notes = (
        f"vLLM CPU build, {torch.get_num_threads()} threads, bf16; random Mixtral-shaped "
        f"model (hidden {shape['hidden_size']}, intermediate {shape['intermediate_size']}, "
        f"{shape['num_hidden_layers']} layers, 8 experts, top-2); prompts of {PROMPT} tokens, {new_tokens} "
        f"greedy tokens per request; {CONCURRENT} requests submitted together to the offline engine (what 16 "
        f"concurrent server requests become: one batch). Medians of {rounds} rounds alternating between the two "
        f"engines. `{command}`" + (" Tiny smoke shapes: not the measurement." if args.smoke else "")
    )
    write_table(args.out or results_path("vllm_serve.md", args.smoke), "vLLM on CPU: optimum-moeq against bf16",
                ["model", "requests at once", "generated tokens/s", "vs bf16"], rows, notes)  # fmt: skip


if __name__ == "__main__":  # vLLM's CPU backend spawns its processes: they re-import this module
    main()
