"""Run by tests/test_vllm.py with the vLLM environment's python (vLLM pins its own transformers):
greedy completions of a checkpoint through vLLM's offline ``LLM`` and through its OpenAI-compatible
server on loopback (asked with the ``openai`` client). Prints one JSON line:
{"offline": [{"tokens": [...], "logprobs": [...]}, ...], "server": [...]}.

    python tests/vllm_driver.py CHECKPOINT PROMPTS_JSON NEW_TOKENS [--tensor-parallel N] [--no-server]
        [--dtype float32|bfloat16]
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import time

ENGINE = dict(max_model_len=64, enforce_eager=True, max_num_seqs=4)
CPU_MEMORY_FRACTION = 0.05  # vLLM's CPU backend reserves this share of the machine for its KV cache


def offline(path: str, prompts: list[list[int]], new_tokens: int, tensor_parallel: int, dtype: str) -> list[dict]:
    from vllm import LLM, SamplingParams

    llm = LLM(
        path, dtype=dtype, gpu_memory_utilization=CPU_MEMORY_FRACTION, tensor_parallel_size=tensor_parallel, **ENGINE
    )
    params = SamplingParams(max_tokens=new_tokens, temperature=0, logprobs=0, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    return [
        {"tokens": list(o.outputs[0].token_ids),
         "logprobs": [step[t].logprob for step, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)]}
        for o in outputs
    ]  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server(path: str, prompts: list[list[int]], new_tokens: int, dtype: str) -> list[dict]:
    import openai

    port = _free_port()
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", path, "--host", "127.0.0.1",
               "--port", str(port), "--dtype", dtype, "--max-model-len", str(ENGINE["max_model_len"]),
               "--enforce-eager", "--max-num-seqs", str(ENGINE["max_num_seqs"]),
               "--gpu-memory-utilization", str(CPU_MEMORY_FRACTION)]  # fmt: skip
    process = subprocess.Popen(command, stdout=sys.stderr, stderr=sys.stderr)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        deadline = time.monotonic() + 600
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"vLLM's server exited with {process.returncode} before it answered")
            try:
                client.models.list()
                break
            except openai.APIConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)
        results = []
        for prompt in prompts:
            completion = client.completions.create(
                model=path, prompt=prompt, max_tokens=new_tokens, temperature=0, logprobs=1,
                extra_body={"return_token_ids": True, "ignore_eos": True},
            )  # fmt: skip
            choice = completion.choices[0]
            results.append({"tokens": list(choice.token_ids), "logprobs": list(choice.logprobs.token_logprobs)})
        return results
    finally:
        process.terminate()
        process.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("path")
    parser.add_argument("prompts", type=json.loads)
    parser.add_argument("new_tokens", type=int)
    parser.add_argument("--tensor-parallel", type=int, default=1)
    parser.add_argument("--no-server", action="store_true")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if args.tensor_parallel > 1:  # one CPU per rank (vLLM's CPU backend will not share a NUMA node's otherwise)
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "|".join(map(str, range(args.tensor_parallel))))
    result = {"offline": offline(args.path, args.prompts, args.new_tokens, args.tensor_parallel, args.dtype)}
    if not args.no_server:
        result["server"] = server(args.path, args.prompts, args.new_tokens, args.dtype)
    print("MOEQ_RESULT " + json.dumps(result), flush=True)  # vLLM logs to stdout too


if __name__ == "__main__":  # vLLM's CPU backend spawns its processes: they re-import this module
    main()
