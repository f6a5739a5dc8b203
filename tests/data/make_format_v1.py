"""How tests/data/format_v1 was made (with optimum-moeq at commit 1e1ff22, before the experts
layout refactor): a tiny Mixtral quantized on load with mixed 2/3-bit experts and 4-bit attention,
saved, plus the logits it gave on fixed token ids. test_format_v1.py reloads it with the current
code; rerunning this script would rebuild it with the current code instead, so do not, unless the
saved format itself changes (then bump FORMAT_VERSION and keep the old fixture too)."""

import sys
import tempfile

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, MixtralConfig, MixtralForCausalLM

import optimum_moeq  # noqa: F401  (registers the quantizer)
from optimum_moeq import RouterNormConfig


def main(out: str) -> None:
    config = MixtralConfig(
        vocab_size=96, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=32,
    )  # fmt: skip
    torch.manual_seed(0)
    model = MixtralForCausalLM(config)
    with torch.no_grad():
        for layer in model.model.layers:  # unequal router norms: the ranking has something to rank
            layer.mlp.gate.weight.mul_(torch.tensor([0.5, 1.5, 0.8, 1.2])[:, None])
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        quantized = AutoModelForCausalLM.from_pretrained(
            tmp,
            dtype=torch.float32,
            quantization_config=RouterNormConfig(avg_bits=2.5, group_size=32, attention_bits=4),
        )
    quantized.save_pretrained(out)
    ids = torch.randint(0, config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = quantized(ids).logits
    save_file({"input_ids": ids, "logits": logits.contiguous()}, f"{out}/expected_logits.safetensors")


if __name__ == "__main__":
    main(sys.argv[1])
