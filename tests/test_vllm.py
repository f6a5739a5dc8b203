"""Serving with vLLM (optimum_moeq/vllm): tensor-parallel slices of packed experts against the
dequantized weight (no vLLM needed), and the real engine on CPU against transformers.

vLLM pins a transformers older than this project's, so the engine runs in its own environment:
``bash tests/vllm_env.sh`` makes it (``.venv-vllm``, or the python named by $MOEQ_VLLM_PYTHON) and
the README's test command runs it first. Each engine test quantizes a tiny model here, saves it,
and runs tests/vllm_driver.py with that python: greedy tokens must equal transformers' greedy
tokens from the same checkpoint, and their log-probabilities agree within float rounding (float32:
1e-3; bf16, on a prompt whose choices lead by several bf16 steps: 0.15).
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import tiny_mixtral_config
from transformers import (
    AutoModelForCausalLM,
    MixtralForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

from optimum_moeq import RouterNormConfig
from optimum_moeq.demo import word_tokenizer
from optimum_moeq.kernels.reference import dequantize_packed
from optimum_moeq.nn import MixedBitExperts
from optimum_moeq.vllm import check_tensor_parallel, shard_packed, shard_zero_codes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VLLM_PYTHON = os.environ.get("MOEQ_VLLM_PYTHON") or os.path.join(ROOT, ".venv-vllm", "bin", "python")
PROMPTS = [[1, 5, 9, 20], [7, 3, 64, 100, 12, 4]]
# bf16: a prompt whose greedy steps all lead their runner-up by 3+ bf16 steps of the logits (0.0625
# here) in transformers, so that rounding differences between the engines cannot flip a choice
BF16_PROMPT, BF16_MARGIN = [58, 43, 81, 84, 119], 0.15  # its least lead is 1.9 (format 2, integer zeros)
NEW_TOKENS = 8
VOCAB = 128
LOGIT_SCALE = 20.0


def _shard(layout, name, tensor, rank, gated):
    """A stored field's slice as vLLM's loader takes it (integer zeros through their values)."""
    proj, bits, field = layout.field_of(name)
    if field == "zero" and not tensor.dtype.is_floating_point:
        return shard_zero_codes(tensor, bits, layout.projections[proj][0], proj, rank, 2, gated)
    return shard_packed(tensor, proj, rank, 2, gated)


@pytest.mark.parametrize("integer_zeros", [False, True], ids=["float_zeros", "integer_zeros"])
@pytest.mark.parametrize("gated", [True, False])
def test_tensor_parallel_slices_are_the_dequantized_weight_sliced(gated, integer_zeros):
    """Rank r of 2 holds gate rows [r I/2, (r+1) I/2) and the same up rows (gated), and down
    columns [r I/2, (r+1) I/2), for every width: the slices of every stored field dequantize to the
    slices of the whole weight."""
    torch.manual_seed(0)
    inter, group = 128, 32
    module = MixedBitExperts([1, 2, 3, 4, 8, 2], hidden_dim=64, intermediate_dim=inter, group_size=group, gated=gated,
                             integer_zeros=integer_zeros)  # fmt: skip
    for proj, (e, n, k) in module.projection_shapes.items():
        module.store(module.quantize_projection(proj, torch.randn(e, n, k)))
    check_tensor_parallel(inter, group, 2)
    for rank in range(2):
        sliced = {name: _shard(module.layout, name, tensor, rank, gated) for name, tensor in module.named_parameters()}
        for expert in range(module.num_experts):
            whole_in = dequantize_packed(module.expert_projection(module.input_projection, expert))
            whole_down = dequantize_packed(module.expert_projection("down_proj", expert))
            rows = torch.arange(rank * inter // 2, (rank + 1) * inter // 2)
            in_rows = torch.cat([rows, rows + inter]) if gated else rows
            shard_layout = MixedBitExperts(
                module.expert_bits, hidden_dim=64, intermediate_dim=inter // 2, group_size=group, gated=gated,
                integer_zeros=integer_zeros,
            ).layout  # fmt: skip
            got_in = dequantize_packed(shard_layout.expert(sliced, module.input_projection, expert))
            got_down = dequantize_packed(shard_layout.expert(sliced, "down_proj", expert))
            assert torch.equal(got_in, whole_in[in_rows]), (rank, expert)
            assert torch.equal(got_down, whole_down[:, rows]), (rank, expert)


def test_splits_off_groups_or_blocks_are_refused_with_the_sizes_allowed():
    with pytest.raises(ValueError, match=r"tensor parallel size 3 does not divide its 128 intermediate features"):
        check_tensor_parallel(128, 32, 3)
    with pytest.raises(
        ValueError, match=r"gives each rank 32 .*multiples of 64\); tensor parallel sizes allowed here: \[1, 2\]"
    ):
        check_tensor_parallel(128, 64, 4)


def _vllm_available() -> bool:
    if not os.path.isfile(VLLM_PYTHON):
        return False
    found = subprocess.run([VLLM_PYTHON, "-c", "import vllm, optimum_moeq.vllm"], capture_output=True)
    return found.returncode == 0


needs_vllm = pytest.mark.skipif(
    not _vllm_available(), reason=f"no vLLM environment at {VLLM_PYTHON}: run `bash tests/vllm_env.sh`"
)


def _families():
    common = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  vocab_size=VOCAB, max_position_embeddings=64, bos_token_id=1, eos_token_id=2)  # fmt: skip
    moe = dict(intermediate_size=256, moe_intermediate_size=128, num_experts=8, num_experts_per_tok=2)
    return {
        "mixtral": (MixtralForCausalLM, tiny_mixtral_config(**{**common, "intermediate_size": 128})),
        "qwen3_moe": (Qwen3MoeForCausalLM, Qwen3MoeConfig(head_dim=32, norm_topk_prob=True, **common, **moe)),
        "qwen2_moe (shared expert)": (
            Qwen2MoeForCausalLM,
            Qwen2MoeConfig(shared_expert_intermediate_size=256, norm_topk_prob=False, **common, **moe),
        ),
    }


@torch.no_grad()
def _transformers_greedy(folder, prompts=PROMPTS, dtype=torch.float32) -> list[dict]:
    """Greedy decoding by hand (no generate(): no stopping, no logits processors), with each chosen
    token's log-probability and its lead over the runner-up."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    results = []
    for prompt in prompts:
        ids, tokens, logprobs, margins = list(prompt), [], [], []
        for _ in range(NEW_TOKENS):
            top = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].float(), dim=-1).topk(2)
            tokens.append(int(top.indices[0]))
            logprobs.append(top.values[0].item())
            margins.append((top.values[0] - top.values[1]).item())
            ids.append(tokens[-1])
        results.append({"tokens": tokens, "logprobs": logprobs, "margin": min(margins)})
    return results


def _quantized(tmp_path, family: str, **quantization_options):
    cls, config = _families()[family]
    torch.manual_seed(0)
    dense = tmp_path / "dense"
    model = cls(config)
    with torch.no_grad():  # peaked next-token distributions: a random model's are near-uniform, full of ties
        model.lm_head.weight *= LOGIT_SCALE
    model.to(torch.bfloat16).save_pretrained(dense)
    folder = tmp_path / "moeq"
    quantization = RouterNormConfig(avg_bits=2.5, method="rtn", group_size=32, **quantization_options)
    model = AutoModelForCausalLM.from_pretrained(dense, quantization_config=quantization, dtype=torch.bfloat16)
    assert len({b for bits in model.hf_quantizer.allocation.bits.values() for b in bits}) == 2  # mixed widths
    model.save_pretrained(folder)
    word_tokenizer([" ".join(f"w{i}" for i in range(VOCAB - 3))]).save_pretrained(folder)
    return folder


def _vllm(folder, *extra, prompts=PROMPTS) -> dict:
    command = [VLLM_PYTHON, os.path.join(ROOT, "tests", "vllm_driver.py"), str(folder), json.dumps(prompts),
               str(NEW_TOKENS), *extra]  # fmt: skip
    environment = {**os.environ, "TRITON_INTERPRET": "0"}
    run = subprocess.run(command, capture_output=True, text=True, timeout=900, env=environment)
    assert run.returncode == 0, run.stderr[-6000:]
    (line,) = [line for line in run.stdout.splitlines() if line.startswith("MOEQ_RESULT ")]
    return json.loads(line.removeprefix("MOEQ_RESULT "))


def _assert_same(vllm_results, expected, where, logprob_tolerance=1e-3):
    for got, want in zip(vllm_results, expected, strict=True):
        assert got["tokens"] == want["tokens"], where
        assert max(abs(a - b) for a, b in zip(got["logprobs"], want["logprobs"])) < logprob_tolerance, where


@needs_vllm
@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "qwen2_moe (shared expert)"])
def test_vllm_serves_the_checkpoint_as_saved_with_transformers_greedy_tokens(family, tmp_path):
    folder = _quantized(tmp_path, family)
    expected = _transformers_greedy(folder)
    if family == "mixtral":  # the OpenAI-compatible server too, asked with the openai client
        results = _vllm(folder)
        _assert_same(results["server"], expected, "server")
    else:
        results = _vllm(folder, "--no-server")
    _assert_same(results["offline"], expected, "offline LLM")


@needs_vllm
def test_vllm_in_bf16_gives_transformers_bf16_tokens(tmp_path):
    folder = _quantized(tmp_path, "mixtral")
    expected = _transformers_greedy(folder, [BF16_PROMPT], torch.bfloat16)
    assert expected[0]["margin"] >= BF16_MARGIN  # else the prompt cannot tell the engines apart from rounding
    results = _vllm(folder, "--no-server", "--dtype", "bfloat16", prompts=[BF16_PROMPT])
    _assert_same(results["offline"], expected, "offline LLM, bf16", logprob_tolerance=0.15)


@needs_vllm
def test_vllm_tensor_parallel_2_on_cpu_gives_the_same_tokens(tmp_path):
    folder = _quantized(tmp_path, "mixtral")
    _assert_same(
        _vllm(folder, "--tensor-parallel", "2", "--no-server")["offline"], _transformers_greedy(folder), "TP=2"
    )


def _quantized_linears(folder, field: str) -> set[str]:
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return {name.removesuffix(field) for name in f.keys() if name.endswith(field)}


@needs_vllm
@pytest.mark.parametrize(
    "family, tensor_parallel, options, field",
    [
        ("qwen2_moe (shared expert)", 1, dict(attention_bits=4), ".weight_scale"),
        ("mixtral", 2, dict(attention_bits=4), ".weight_scale"),
        ("qwen2_moe (shared expert)", 2, dict(attention_method="bnb_nf4"), ".weight_absmax"),
        ("mixtral", 1, dict(attention_method="bnb_int8"), ".weight_row_scale"),
    ],
    ids=["packed-qwen2_moe", "packed-mixtral-tp2", "nf4-qwen2_moe-tp2", "int8-mixtral"],
)
def test_vllm_serves_quantized_attention_and_dense_linears(family, tensor_parallel, options, field, tmp_path):
    """attention_bits (packed) and bitsandbytes' formats: vLLM's fused qkv_proj (with Qwen2-MoE's
    biases) and the shared expert's merged gate_up_proj hold the checkpoint's parts side by side;
    at TP=2 o_proj is split by inputs, qkv_proj by heads."""
    folder = _quantized(tmp_path, family, **options)
    quantized = _quantized_linears(folder, field)
    assert "model.layers.1.self_attn.k_proj" in quantized and "model.layers.1.self_attn.o_proj" in quantized
    assert ("model.layers.0.mlp.shared_expert.gate_proj" in quantized) == family.startswith("qwen2_moe")
    assert not any(name.endswith("gate") for name in quantized)  # routers stay full precision
    results = _vllm(folder, "--no-server", "--tensor-parallel", str(tensor_parallel))
    _assert_same(results["offline"], _transformers_greedy(folder), f"{options}, TP={tensor_parallel}")


@needs_vllm
def test_a_fused_linear_stored_partly_packed_is_refused_by_vllm(tmp_path):
    folder = _quantized(tmp_path, "mixtral", attention_bits=4, modules_to_not_convert=["k_proj"])
    command = [VLLM_PYTHON, os.path.join(ROOT, "tests", "vllm_driver.py"), str(folder), json.dumps(PROMPTS), "2",
               "--no-server"]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert run.returncode != 0
    assert "the checkpoint stores only some of them quantized" in run.stderr + run.stdout, run.stderr[-3000:]


@needs_vllm
def test_a_checkpoint_whose_config_was_edited_is_refused_by_vllm(tmp_path):
    folder = _quantized(tmp_path, "mixtral")
    config = json.loads((folder / "config.json").read_text())
    allocation = config["quantization_config"]["allocation"]
    name = next(iter(allocation))
    edited = allocation[name][1:] + allocation[name][:1]  # the same widths, on other experts
    assert edited != allocation[name]
    allocation[name] = edited
    (folder / "config.json").write_text(json.dumps(config))
    command = [VLLM_PYTHON, os.path.join(ROOT, "tests", "vllm_driver.py"), str(folder), json.dumps(PROMPTS), "2",
               "--no-server"]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert run.returncode != 0
    assert "does not match the one the packed weights were saved with" in run.stderr, run.stderr[-3000:]


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
