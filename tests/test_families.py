"""Every supported MoE family, from a tiny random model of its transformers config: quantize on
load -> logits equal the model with dequantized experts -> save -> reload -> identical logits."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

from optimum_moeq import MixedBitExperts, RouterNormConfig
from optimum_moeq.kernels import dequantize_packed

_ATTENTION = dict(vocab_size=64, num_attention_heads=2, num_key_value_heads=2)
FAMILIES = {
    "qwen2_moe": dict(
        **_ATTENTION, hidden_size=32, intermediate_size=64, moe_intermediate_size=32,
        shared_expert_intermediate_size=32, num_hidden_layers=2, num_experts=8, num_experts_per_tok=2,
    ),
    "qwen3_moe": dict(
        **_ATTENTION, hidden_size=32, intermediate_size=64, moe_intermediate_size=32, num_hidden_layers=2,
        num_experts=8, num_experts_per_tok=2, head_dim=16,
    ),
    "olmoe": dict(**_ATTENTION, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_experts=8,
                  num_experts_per_tok=2, eos_token_id=1, pad_token_id=0),
    "deepseek_v3": dict(
        **_ATTENTION, hidden_size=32, intermediate_size=64, moe_intermediate_size=32, num_hidden_layers=3,
        n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1, n_group=1,
        topk_group=1, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
    ),
    "switch_transformers": dict(
        vocab_size=64, d_model=32, d_ff=64, d_kv=8, num_layers=2, num_decoder_layers=2, num_heads=2,
        num_experts=8, encoder_sparse_step=1, decoder_sparse_step=2,
    ),
    "mixtral": dict(**_ATTENTION, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_local_experts=8,
                    num_experts_per_tok=2),
}  # fmt: skip
EXPECTED_MOE_LAYERS = {"deepseek_v3": 2, "switch_transformers": 3}  # dense first layer; decoder every 2nd


def _auto_class(model_type):
    return AutoModelForSeq2SeqLM if model_type == "switch_transformers" else AutoModelForCausalLM


def _logits(model):
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(2, 64, (2, 10), generator=generator)
    with torch.no_grad():
        if model.config.is_encoder_decoder:
            return model(input_ids=tokens, decoder_input_ids=tokens[:, :6]).logits
        return model(tokens).logits


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    model_type = request.param
    torch.manual_seed(0)
    model = _auto_class(model_type).from_config(AutoConfig.for_model(model_type, **FAMILIES[model_type]))
    path = tmp_path_factory.mktemp(model_type)
    model.save_pretrained(path)
    quantized = _auto_class(model_type).from_pretrained(
        path, quantization_config=RouterNormConfig(method="rtn", avg_bits=2.5, group_size=16), dtype=torch.float32
    )
    return model_type, path, quantized


def _experts_modules(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, MixedBitExperts)}


def test_every_moe_layer_is_replaced_with_half_the_experts_at_three_bits(family):
    model_type, _, quantized = family
    modules = _experts_modules(quantized)
    assert len(modules) == EXPECTED_MOE_LAYERS.get(model_type, 2)
    assert sorted(quantized.config.quantization_config.allocation) == sorted(modules)
    for module in modules.values():
        assert sorted(module.expert_bits) == [2] * 4 + [3] * 4


def _load_dequantized_reference(path, model_type, quantized):
    reference = _auto_class(model_type).from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        for name, module in _experts_modules(quantized).items():
            original = reference.get_submodule(name)
            for e in range(module.num_experts):
                w_in = dequantize_packed(module.expert_projection(module.input_projection, e))
                w_down = dequantize_packed(module.expert_projection("down_proj", e))
                if model_type == "switch_transformers":
                    original[f"expert_{e}"].wi.weight.copy_(w_in)
                    original[f"expert_{e}"].wo.weight.copy_(w_down)
                else:
                    original.gate_up_proj[e] = w_in
                    original.down_proj[e] = w_down
    return reference


def test_logits_equal_the_dequantized_reference(family):
    model_type, path, quantized = family
    original_logits = _logits(_auto_class(model_type).from_pretrained(path, dtype=torch.float32))
    reference = _load_dequantized_reference(path, model_type, quantized)
    logits = _logits(quantized)
    assert (logits - _logits(reference)).abs().max() < 1e-4
    assert (logits - original_logits).abs().max() > 1e-3


def test_save_reload_and_triton_path(family, tmp_path):
    model_type, _, quantized = family
    quantized.save_pretrained(tmp_path)
    reloaded = _auto_class(model_type).from_pretrained(tmp_path)
    logits = _logits(quantized)
    assert torch.equal(_logits(reloaded), logits)
    pytest.importorskip("triton")
    for module in _experts_modules(reloaded).values():
        module.kernel = "triton"
    assert ((_logits(reloaded) - logits).norm() / logits.norm()) < 1e-5
