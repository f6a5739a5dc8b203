"""End to end through transformers: quantize on load, forward, bytes, save, reload."""

import json

import pytest
import torch
from conftest import HIDDEN, HIGH_VARIANCE_EXPERT, INTERMEDIATE, NUM_EXPERTS, ROUTER_NORMS
from transformers import AutoModelForCausalLM, MixtralForCausalLM

import optimum_moeq
from optimum_moeq import MixedBitExperts, RouterNormConfig, experts_footprint
from optimum_moeq.kernels import dequantize_packed

GROUP = 32
TOKENS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))


def _quantize(path, **kwargs):
    return AutoModelForCausalLM.from_pretrained(
        path,
        quantization_config=RouterNormConfig(**{"method": "rtn", "group_size": GROUP, **kwargs}),
        dtype=torch.float32,
    )


def _logits(model):
    with torch.no_grad():
        return model(TOKENS).logits


@pytest.fixture(scope="module")
def quantized(tiny_mixtral_path):
    return _quantize(tiny_mixtral_path, avg_bits=2.5)


def _three_bit_experts(model, layer):
    return {e for e, b in enumerate(model.model.layers[layer].mlp.experts.expert_bits) if b == 3}


def test_combined_ranking_gives_four_experts_three_bits_by_the_paper_rule(quantized):
    for layer, norms in enumerate(ROUTER_NORMS):
        module = quantized.model.layers[layer].mlp.experts
        assert isinstance(module, MixedBitExperts)
        assert sorted(module.expert_bits) == [2, 2, 2, 2, 3, 3, 3, 3]
        # The loud expert jumps to the front; the three smallest router norms of the rest follow.
        loud = HIGH_VARIANCE_EXPERT[layer]
        quiet = sorted((e for e in range(NUM_EXPERTS) if e != loud), key=lambda e: norms[e])[:3]
        assert _three_bit_experts(quantized, layer) == {loud, *quiet}
    name = "model.layers.0.mlp.experts"
    assert quantized.config.quantization_config.allocation[name] == quantized.model.layers[0].mlp.experts.expert_bits


def test_router_ranking_gives_three_bits_to_the_smallest_router_norms(tiny_mixtral_path):
    model = _quantize(tiny_mixtral_path, avg_bits=2.5, ranking="router")
    for layer, norms in enumerate(ROUTER_NORMS):
        assert _three_bit_experts(model, layer) == set(sorted(range(NUM_EXPERTS), key=lambda e: norms[e])[:4])


def test_logits_equal_the_model_with_dequantized_experts(tiny_mixtral_path, quantized):
    reference = AutoModelForCausalLM.from_pretrained(tiny_mixtral_path, dtype=torch.float32)
    original_logits = _logits(reference)
    with torch.no_grad():
        for layer, q_layer in zip(reference.model.layers, quantized.model.layers):
            for proj in ("gate_up_proj", "down_proj"):
                weight = getattr(layer.mlp.experts, proj)
                for e in range(NUM_EXPERTS):
                    weight[e] = dequantize_packed(q_layer.mlp.experts.expert_projection(proj, e))
    quantized_logits = _logits(quantized)
    assert (quantized_logits - _logits(reference)).abs().max() < 1e-4
    assert (quantized_logits - original_logits).abs().max() > 1e-2


def test_only_experts_are_quantized(quantized):
    layer = quantized.model.layers[0]
    assert layer.self_attn.q_proj.weight.dtype == torch.float32
    assert layer.mlp.gate.weight.dtype == torch.float32
    assert quantized.lm_head.weight.dtype == torch.float32


def test_expert_bytes_match_the_packed_sizes(quantized):
    weights_per_expert = 2 * INTERMEDIATE * HIDDEN + HIDDEN * INTERMEDIATE
    bits = [b for layer in quantized.model.layers for b in layer.mlp.experts.expert_bits]
    code_bytes = sum(b * weights_per_expert // 8 for b in bits)
    # per group: a float16 scale and a b-bit integer zero (format 2; output counts are multiples of 32)
    metadata_bytes = sum((16 + b) * weights_per_expert // GROUP // 8 for b in bits)
    stored = sum(
        p.numel() * p.element_size() for layer in quantized.model.layers for p in layer.mlp.experts.parameters()
    )
    footprint = experts_footprint(quantized)
    assert stored == code_bytes + metadata_bytes == footprint.total_bytes
    assert footprint.code_bytes == code_bytes
    assert footprint.bits_per_weight == 2.5
    assert footprint.bits_per_weight_with_metadata == 2.5 + (16 + 2.5) / GROUP


def test_save_and_reload_give_identical_logits(quantized, tmp_path):
    quantized.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert saved["quant_method"] == "moeq"
    assert (saved["integer_zeros"], saved["format_version"]) == (True, 2)
    assert saved["allocation"]["model.layers.1.mlp.experts"] == quantized.model.layers[1].mlp.experts.expert_bits
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    for layer, q_layer in zip(reloaded.model.layers, quantized.model.layers):
        assert layer.mlp.experts.expert_bits == q_layer.mlp.experts.expert_bits
        assert layer.mlp.experts.gate_up_proj_b3_scale.dtype == torch.float16
        assert layer.mlp.experts.gate_up_proj_b3_zero.dtype == torch.int32  # 3-bit integer zeros
    assert torch.equal(_logits(reloaded), _logits(quantized))


def test_float16_zeros_on_request_save_as_format_1_and_reload(tiny_mixtral_path, tmp_path):
    model = _quantize(tiny_mixtral_path, avg_bits=2.5, integer_zeros=False)
    experts = model.model.layers[0].mlp.experts
    assert experts.gate_up_proj_b2_zero.dtype == torch.float16
    assert experts_footprint(model).bits_per_weight_with_metadata == 2.5 + 32 / GROUP
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert (saved["integer_zeros"], saved["format_version"]) == (False, 1)
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(tmp_path)), _logits(model))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda bits: bits.pop(), r"lists 7 bit-widths but the module has 8 experts"),
        (
            lambda bits: bits.__setitem__(2, 9),
            r"allocation\['model.layers.0.mlp.experts'\]\[2\]: bits=9 is not supported",
        ),
        # same widths, other experts: the packed shapes cannot tell, the shards' recorded allocation can
        (lambda bits: bits.reverse(), "config.json's allocation does not match the one the packed weights were saved"),
    ],
)
def test_tampered_allocation_is_refused_on_reload(quantized, tmp_path, edit, message):
    quantized.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    edit(config["quantization_config"]["allocation"]["model.layers.0.mlp.experts"])
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_a_checkpoint_missing_packed_weights_is_refused_not_loaded_with_garbage(quantized, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    quantized.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        metadata = f.metadata()  # a writer that keeps optimum-moeq's record
    dropped = next(name for name in tensors if name.endswith("down_proj_b3_scale"))
    del tensors[dropped]
    save_file(tensors, tmp_path / "model.safetensors", metadata=metadata)
    with pytest.raises(ValueError, match=r"the checkpoint lacks weights .*down_proj_b3_scale"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_avg_bits_outside_the_levels_fails_before_any_weight_is_read(tiny_mixtral_path, monkeypatch):
    with pytest.raises(ValueError, match=r"avg_bits=5 is outside the bit levels \(2, 3\)"):
        RouterNormConfig(method="rtn", avg_bits=5, bit_levels=(2, 3))

    def no_reading(*args, **kwargs):
        raise AssertionError("a weight was read")

    monkeypatch.setattr(optimum_moeq.allocation.checkpoint, "safe_open", no_reading)
    monkeypatch.setattr(MixtralForCausalLM, "_load_pretrained_model", no_reading)
    config = RouterNormConfig(method="rtn", avg_bits=2.5)
    config.avg_bits = 5  # edited after construction: checked again when loading starts
    with pytest.raises(ValueError, match=r"avg_bits=5 is outside the bit levels \(2, 3\)"):
        AutoModelForCausalLM.from_pretrained(tiny_mixtral_path, quantization_config=config)


def test_group_size_that_does_not_divide_is_named_at_load(tiny_mixtral_path):
    with pytest.raises(ValueError, match=r"group_size=48 does not divide the input dimension 64 of model\.layers\.0"):
        AutoModelForCausalLM.from_pretrained(
            tiny_mixtral_path, quantization_config=RouterNormConfig(method="rtn", group_size=48)
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dtypes_and_device_map_auto(quantized, tmp_path, dtype):
    quantized.save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=dtype, device_map="auto")
    logits = _logits(model)
    assert logits.dtype == dtype and torch.isfinite(logits).all()
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == dtype
    assert model.model.layers[0].mlp.experts.down_proj_b2_scale.dtype == torch.float16  # metadata keeps its dtype
    reference = _logits(quantized)
    assert ((logits.float() - reference).norm() / reference.norm()) < 0.05


def test_modules_to_not_convert_keeps_an_experts_module(tiny_mixtral_path, tmp_path):
    model = _quantize(tiny_mixtral_path, avg_bits=2.5, modules_to_not_convert=["model.layers.1.mlp.experts"])
    assert isinstance(model.model.layers[0].mlp.experts, MixedBitExperts)
    assert not isinstance(model.model.layers[1].mlp.experts, MixedBitExperts)
    assert list(model.config.quantization_config.allocation) == ["model.layers.0.mlp.experts"]
    model.save_pretrained(tmp_path)
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(tmp_path)), _logits(model))


def test_dense_and_unsupported_models_are_refused(tmp_path):
    from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM

    small = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    LlamaForCausalLM(LlamaConfig(**small)).save_pretrained(tmp_path / "dense")
    with pytest.raises(ValueError, match="model_type='llama' is not a Mixture-of-Experts model"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "dense", quantization_config=RouterNormConfig(method="rtn"))
    moe = AutoConfig.for_model("granitemoe", **small, num_local_experts=4, num_experts_per_tok=2)
    AutoModelForCausalLM.from_config(moe).save_pretrained(tmp_path / "moe")
    with pytest.raises(
        ValueError, match=r"model_type='granitemoe' is a MoE architecture .* supported are \('mixtral', "
    ):
        AutoModelForCausalLM.from_pretrained(tmp_path / "moe", quantization_config=RouterNormConfig(method="rtn"))
    from optimum_moeq.models import get_adapter

    with pytest.raises(ValueError, match="model_type='dbrx' is a MoE architecture"):  # experts in ffn_config
        get_adapter(AutoConfig.for_model("dbrx"))


def test_the_base_model_class_is_refused_with_the_class_to_use(tiny_mixtral_path, quantized, tmp_path):
    from transformers import AutoModel

    message = r"MixtralModel is the base model without its head.*load the full model \(AutoModelForCausalLM\)"
    with pytest.raises(ValueError, match=message):
        AutoModel.from_pretrained(
            tiny_mixtral_path, quantization_config=RouterNormConfig(method="rtn", group_size=GROUP)
        )
    quantized.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=message):
        AutoModel.from_pretrained(tmp_path)


def test_a_supported_family_configured_without_moe_layers_says_so(tmp_path):
    from transformers import AutoConfig

    config = AutoConfig.for_model(
        "qwen3_moe", vocab_size=64, hidden_size=64, intermediate_size=64, moe_intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
        mlp_only_layers=[0, 1],
    )  # fmt: skip
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="this qwen3_moe model has no MoE layer"):
        AutoModelForCausalLM.from_pretrained(
            tmp_path, quantization_config=RouterNormConfig(method="rtn", group_size=32)
        )


def test_quantize_on_load_with_device_map_auto_in_bfloat16(tiny_mixtral_path):
    model = AutoModelForCausalLM.from_pretrained(
        tiny_mixtral_path,
        quantization_config=RouterNormConfig(method="rtn", group_size=GROUP),
        dtype=torch.bfloat16,
        device_map="auto",
    )
    assert not [name for name, p in model.named_parameters() if p.device.type == "meta"]
    assert not hasattr(model.model.layers[0].mlp.experts, "gate_up_proj")  # placeholder dropped
    assert _logits(model).dtype == torch.bfloat16


def test_a_given_allocation_is_used_as_it_is(tiny_mixtral_path):
    bits = {f"model.layers.{i}.mlp.experts": [4, 2, 2, 2, 3, 3, 2, 2] for i in range(2)}
    model = _quantize(tiny_mixtral_path, avg_bits=2.5, allocation=bits)
    assert model.model.layers[1].mlp.experts.expert_bits == [4, 2, 2, 2, 3, 3, 2, 2]
    assert model.config.quantization_config.allocation == bits


def test_excluding_every_experts_module_is_refused_before_the_checkpoint_is_read(tiny_mixtral_path, monkeypatch):
    import optimum_moeq.quantizer as quantizer

    monkeypatch.setattr(quantizer, "allocate_from_files", lambda *a, **k: pytest.fail("the checkpoint was read"))
    config = RouterNormConfig(method="rtn", group_size=GROUP, modules_to_not_convert=["experts"])
    with pytest.raises(ValueError, match=r"modules_to_not_convert=\['experts'\] excludes every experts module"):
        AutoModelForCausalLM.from_pretrained(tiny_mixtral_path, quantization_config=config)
