"""attention_bits: the non-expert linears group-quantized with the same machinery."""

import pytest
import torch
from conftest import HIDDEN, save_tiny_switch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

from optimum_moeq import RouterNormConfig, experts_footprint, model_footprint
from optimum_moeq.kernels import dequantize_packed
from optimum_moeq.nn import PackedLinear

GROUP = 32
TOKENS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def quantized(tiny_mixtral_path):
    config = RouterNormConfig(method="rtn", avg_bits=2.5, group_size=GROUP, attention_bits=4)
    return AutoModelForCausalLM.from_pretrained(tiny_mixtral_path, quantization_config=config, dtype=torch.float32)


def _logits(model):
    with torch.no_grad():
        return model(TOKENS).logits


def test_attention_is_packed_and_routers_and_lm_head_are_not(quantized):
    packed = {name for name, m in quantized.named_modules() if isinstance(m, PackedLinear)}
    expected = {f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
    assert packed == expected
    assert all(quantized.get_submodule(name).bits == 4 for name in packed)
    assert type(quantized.lm_head) is torch.nn.Linear and quantized.lm_head.weight.dtype == torch.float32
    assert quantized.model.layers[0].mlp.gate.weight.dtype == torch.float32


def test_logits_equal_the_dequantized_reference(tiny_mixtral_path, quantized):
    reference = AutoModelForCausalLM.from_pretrained(tiny_mixtral_path, dtype=torch.float32)
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if isinstance(module, PackedLinear):
                reference.get_submodule(name).weight.copy_(dequantize_packed(module.packed()))
            elif hasattr(module, "expert_projection"):
                target = reference.get_submodule(name)
                for e in range(module.num_experts):
                    target.gate_up_proj[e] = dequantize_packed(module.expert_projection("gate_up_proj", e))
                    target.down_proj[e] = dequantize_packed(module.expert_projection("down_proj", e))
    assert (_logits(quantized) - _logits(reference)).abs().max() < 1e-4


def test_true_bytes_count_every_packed_linear(quantized):
    footprint = model_footprint(quantized)
    q_out, kv_out = HIDDEN, 2 * (HIDDEN // 4)  # 4 heads, 2 key-value heads
    weights = 2 * (2 * q_out * HIDDEN + 2 * kv_out * HIDDEN)  # q, o, k, v in two layers
    # 4-bit codes; per group a float16 scale and a 4-bit integer zero (format 2)
    assert footprint.packed_linear_bytes == weights * 4 // 8 + (weights // GROUP) * 2 + (weights // GROUP) * 4 // 8
    assert footprint.experts_bytes == experts_footprint(quantized).total_bytes
    assert footprint.total_bytes == quantized.get_memory_footprint()


def test_save_and_reload_keep_the_packed_linears(quantized, tmp_path):
    quantized.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(reloaded.model.layers[1].self_attn.o_proj, PackedLinear)
    assert torch.equal(_logits(reloaded), _logits(quantized))


def test_shared_experts_are_dense_linears_but_their_gate_is_a_router(tmp_path):
    config = AutoConfig.for_model(
        "qwen2_moe", vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=32,
        shared_expert_intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
        num_experts=4, num_experts_per_tok=2,
    )  # fmt: skip
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(
        tmp_path, quantization_config=RouterNormConfig(method="rtn", group_size=16, attention_bits=8)
    )
    mlp = model.model.layers[0].mlp
    assert isinstance(mlp.shared_expert.gate_proj, PackedLinear) and mlp.shared_expert.gate_proj.bits == 8
    assert type(mlp.shared_expert_gate) is torch.nn.Linear


def test_switch_router_classifier_stays_full_precision(tmp_path):
    save_tiny_switch(tmp_path)
    model = AutoModelForSeq2SeqLM.from_pretrained(
        tmp_path, quantization_config=RouterNormConfig(method="rtn", group_size=16, attention_bits=4)
    )
    block = model.encoder.block[0]
    assert type(block.layer[1].mlp.router.classifier) is torch.nn.Linear
    assert isinstance(block.layer[0].SelfAttention.q, PackedLinear)


@pytest.mark.parametrize("attention", [dict(attention_bits=8), dict(attention_method="bnb_int8")])
def test_switch_with_dense_ffn_layers_runs_with_quantized_attention(tmp_path, attention):
    """Switch's dense FFN casts its input to `wo.weight.dtype`, so `wo` stays an nn.Linear there;
    its `wi` and the attention are quantized."""
    if "attention_method" in attention:
        pytest.importorskip("bitsandbytes")
    save_tiny_switch(tmp_path, encoder_sparse_step=2, decoder_sparse_step=2)
    model = AutoModelForSeq2SeqLM.from_pretrained(
        tmp_path, quantization_config=RouterNormConfig(method="rtn", group_size=16, **attention)
    )
    dense = model.encoder.block[0].layer[1].mlp
    assert type(dense.wo) is torch.nn.Linear and type(dense.wi) is not torch.nn.Linear
    assert type(model.encoder.block[0].layer[0].SelfAttention.q) is not torch.nn.Linear
    tokens = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(input_ids=tokens, decoder_input_ids=tokens).logits
    assert logits.shape == (2, 5, 64) and torch.isfinite(logits).all()


def test_switch_checkpoint_without_the_kept_wo_is_refused(tmp_path):
    """Saves by an older optimum-moeq packed the dense FFN's wo; it now stays an nn.Linear, so a
    checkpoint without `wo.weight` would leave it uninitialised: refused instead."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    save_tiny_switch(tmp_path / "base", encoder_sparse_step=2, decoder_sparse_step=2)
    model = AutoModelForSeq2SeqLM.from_pretrained(
        tmp_path / "base", quantization_config=RouterNormConfig(method="rtn", group_size=16, attention_bits=8)
    )
    model.save_pretrained(tmp_path / "q")
    tensors = load_file(tmp_path / "q" / "model.safetensors")
    with safe_open(tmp_path / "q" / "model.safetensors", "pt") as f:
        metadata = f.metadata()  # a writer that keeps optimum-moeq's record
    del tensors["encoder.block.0.layer.1.mlp.wo.weight"]
    save_file(tensors, tmp_path / "q" / "model.safetensors", metadata=metadata)
    with pytest.raises(ValueError, match=r"lacks weights .*encoder.block.0.layer.1.mlp.wo.weight.*re-quantize"):
        AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "q")


def test_attention_bits_outside_1_to_8_is_refused():
    with pytest.raises(ValueError, match=r"attention_bits: bits=16 is not supported: allowed are integers 1 to 8"):
        RouterNormConfig(method="rtn", attention_bits=16)
