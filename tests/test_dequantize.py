"""model.dequantize(): back to the plain transformers model, quantization error included."""

import pytest
import torch
from conftest import save_tiny_switch
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, MixtralForCausalLM
from transformers.models.mixtral.modeling_mixtral import MixtralExperts

from optimum_moeq import RouterNormConfig

TOKENS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))


def _relative(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("attention", [{}, dict(attention_bits=4), dict(attention_method="bnb_int8")])
def test_dequantize_gives_the_plain_model_with_the_same_outputs(tiny_mixtral_path, tmp_path, attention):
    if "attention_method" in attention:
        pytest.importorskip("bitsandbytes")
    config = RouterNormConfig(method="rtn", group_size=32, **attention)
    model = AutoModelForCausalLM.from_pretrained(tiny_mixtral_path, quantization_config=config)
    with torch.no_grad():
        quantized_logits = model(TOKENS).logits
    model = model.dequantize()
    assert type(model.model.layers[0].mlp.experts) is MixtralExperts
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert not model.is_quantized and getattr(model.config, "quantization_config", None) is None
    assert not any(m.training for m in model.modules())
    with torch.no_grad():
        logits = model(TOKENS).logits
    assert _relative(logits, quantized_logits) < 1e-5
    model.save_pretrained(tmp_path)
    plain = MixtralForCausalLM.from_pretrained(tmp_path)  # a plain checkpoint: no optimum-moeq needed
    with torch.no_grad():
        assert torch.equal(plain(TOKENS).logits, logits)


def test_dequantized_weights_are_the_packed_codes_times_scales(tiny_mixtral_path):
    """Independent of the module's forward: float64 (code - zero) * scale from the stored planes."""
    from optimum_moeq.quant.packing import unpack_codes, unpack_zero_codes

    model = AutoModelForCausalLM.from_pretrained(
        tiny_mixtral_path, quantization_config=RouterNormConfig(method="rtn", group_size=32)
    )
    experts = model.model.layers[1].mlp.experts
    expert = 5
    packed = experts.expert_projection("down_proj", expert)
    codes = unpack_codes(packed.q2, packed.q1, packed.bits).double()  # [K, N]
    scale = packed.scale.double().repeat_interleave(32, dim=0)
    assert packed.zero.dtype == torch.int32  # integer zeros, b bits each (format 2)
    zero = unpack_zero_codes(packed.zero, packed.bits, scale.shape[-1]).double().repeat_interleave(32, dim=0)
    expected = ((codes - zero) * scale).T
    model = model.dequantize(dtype=torch.float64)
    weight = model.model.layers[1].mlp.experts.down_proj[expert]
    assert weight.dtype == torch.float64 and torch.allclose(weight, expected, rtol=0, atol=1e-7)


def test_switch_dequantizes_into_its_expert_modules(tmp_path):
    save_tiny_switch(tmp_path, encoder_sparse_step=2, decoder_sparse_step=2)
    model = AutoModelForSeq2SeqLM.from_pretrained(
        tmp_path, quantization_config=RouterNormConfig(method="rtn", group_size=16, attention_bits=8)
    )
    tokens = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        quantized_logits = model(input_ids=tokens, decoder_input_ids=tokens).logits
        model = model.dequantize()
        logits = model(input_ids=tokens, decoder_input_ids=tokens).logits
    assert type(model.encoder.block[1].layer[1].mlp.experts["expert_0"].wi) is torch.nn.Linear
    assert _relative(logits, quantized_logits) < 1e-5  # dropout stays off: eval mode carried over
