"""attention_method="bnb_nf4" / "bnb_int8": bitsandbytes formats for the dense linears."""

import pytest
import torch
from transformers import AutoModelForCausalLM

import optimum_moeq.quantizer as quantizer_module
from optimum_moeq import RouterNormConfig, model_footprint
from optimum_moeq.nn import BnbInt8Linear, BnbNF4Linear

functional = pytest.importorskip("bitsandbytes.functional")
TOKENS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


def _logits(model):
    with torch.no_grad():
        return model(TOKENS).logits


@pytest.mark.parametrize(("method", "cls"), [("bnb_nf4", BnbNF4Linear), ("bnb_int8", BnbInt8Linear)])
def test_bnb_attention_quantizes_runs_saves_and_reloads(tiny_mixtral_path, tmp_path, method, cls):
    config = RouterNormConfig(method="rtn", avg_bits=2.5, group_size=32, attention_method=method)
    model = AutoModelForCausalLM.from_pretrained(tiny_mixtral_path, quantization_config=config, dtype=torch.float32)
    original = AutoModelForCausalLM.from_pretrained(tiny_mixtral_path, dtype=torch.float32)
    for i in range(2):
        for name in ATTENTION:
            layer = getattr(model.model.layers[i].self_attn, name)
            assert isinstance(layer, cls)
            weight = getattr(original.model.layers[i].self_attn, name).weight.detach()
            if method == "bnb_nf4":  # bitsandbytes' own round trip, independently
                packed, state = functional.quantize_4bit(weight, blocksize=64, quant_type="nf4")
                expected = functional.dequantize_4bit(packed, state)
            else:
                codes, scale, _ = functional.int8_vectorwise_quant(weight.half())
                expected = functional.int8_vectorwise_dequant(codes, scale).float()
            assert torch.equal(layer.dequantized(), expected)
    assert type(model.lm_head) is torch.nn.Linear
    logits = _logits(model)
    assert torch.isfinite(logits).all()
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(reloaded.model.layers[1].self_attn.o_proj, cls)
    assert torch.equal(_logits(reloaded), logits)
    stored = sum(p.numel() * p.element_size() for m in model.modules() if isinstance(m, cls) for p in m.parameters())
    assert model_footprint(model).packed_linear_bytes == stored


def test_streaming_gptq_experts_with_nf4_attention(tiny_mixtral_path):
    """GPTQ streams the experts' packed tensors; the NF4 linears still quantize as they load."""
    config = RouterNormConfig(method="gptq", dataset=TOKENS.repeat(1, 40), nsamples=4, seqlen=32, group_size=32,
                              attention_method="bnb_nf4")  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(tiny_mixtral_path, quantization_config=config, dtype=torch.float32)
    assert model.hf_quantizer._streamed == {}  # every streamed tensor was used
    original = AutoModelForCausalLM.from_pretrained(tiny_mixtral_path, dtype=torch.float32)
    packed, state = functional.quantize_4bit(original.model.layers[0].self_attn.q_proj.weight.detach(), blocksize=64,
                                             quant_type="nf4")  # fmt: skip
    assert torch.equal(model.model.layers[0].self_attn.q_proj.dequantized(), functional.dequantize_4bit(packed, state))
    assert torch.isfinite(_logits(model)).all()


def test_nf4_stores_half_a_byte_per_weight_plus_block_scales(tiny_mixtral_path):
    config = RouterNormConfig(method="rtn", avg_bits=2.5, group_size=32, attention_method="bnb_nf4")
    model = AutoModelForCausalLM.from_pretrained(tiny_mixtral_path, quantization_config=config)
    layer = model.model.layers[0].self_attn.q_proj
    numel = layer.in_features * layer.out_features
    assert layer.weight_nf4.numel() * layer.weight_nf4.element_size() == numel // 2
    assert layer.weight_absmax.numel() == numel // 64


def test_bad_attention_method_and_missing_bitsandbytes(tiny_mixtral_path, monkeypatch):
    with pytest.raises(ValueError, match=r"attention_method='nf4' is not supported: allowed are \('moeq', 'bnb_nf4'"):
        RouterNormConfig(method="rtn", attention_method="nf4")
    with pytest.raises(ValueError, match="both quantize the dense linears: give one of them"):
        RouterNormConfig(method="rtn", attention_bits=4, attention_method="bnb_nf4")
    monkeypatch.setattr(quantizer_module, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match="needs bitsandbytes: pip install bitsandbytes"):
        AutoModelForCausalLM.from_pretrained(
            tiny_mixtral_path,
            quantization_config=RouterNormConfig(method="rtn", group_size=32, attention_method="bnb_nf4"),
        )


def test_the_command_line_puts_dense_linears_in_nf4(tiny_mixtral_path, tmp_path):
    from optimum_moeq.cli import main

    out = tmp_path / "out"
    args = ["quantize", "--method", "rtn", str(tiny_mixtral_path), str(out), "--avg-bits", "2.5", "--group-size", "32"]
    assert main([*args, "--attention-method", "bnb_nf4"]) == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.quantization_config.attention_method == "bnb_nf4"
    assert isinstance(model.model.layers[0].self_attn.q_proj, BnbNF4Linear)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the GPU side of bitsandbytes needs a GPU")
@pytest.mark.parametrize("method", ["bnb_nf4", "bnb_int8"])
def test_bnb_attention_on_gpu_matches_cpu_and_reloads_exactly(tiny_mixtral_path, tmp_path, method):
    config = RouterNormConfig(method="rtn", avg_bits=2.5, group_size=32, attention_method=method)
    on_cpu = AutoModelForCausalLM.from_pretrained(tiny_mixtral_path, quantization_config=config, dtype=torch.float32)
    config = RouterNormConfig(method="rtn", avg_bits=2.5, group_size=32, attention_method=method)
    on_gpu = AutoModelForCausalLM.from_pretrained(
        tiny_mixtral_path, quantization_config=config, dtype=torch.float32, device_map="cuda"
    )
    layer_cpu, layer_gpu = on_cpu.model.layers[0].self_attn.q_proj, on_gpu.model.layers[0].self_attn.q_proj
    assert layer_gpu.weight_int8.is_cuda if method == "bnb_int8" else layer_gpu.weight_nf4.is_cuda
    # bitsandbytes' CUDA and CPU kernels agree to rounding on the same weights
    torch.testing.assert_close(layer_gpu.dequantized().cpu(), layer_cpu.dequantized(), rtol=1e-3, atol=1e-3)
    with torch.no_grad():
        logits = on_gpu(TOKENS.cuda()).logits
    on_gpu.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, device_map="cuda")
    with torch.no_grad():
        assert torch.equal(reloaded(TOKENS.cuda()).logits, logits)
    torch.testing.assert_close(logits.cpu(), _logits(on_cpu), rtol=2e-2, atol=2e-2)
