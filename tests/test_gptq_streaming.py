"""Streaming GPTQ (the checkpoint walked one layer at a time before loading) gives the same model
as GPTQ over the fully loaded full-precision model, for every decoder-only family."""

import pytest
import torch
from test_families import FAMILIES
from transformers import AutoConfig, AutoModelForCausalLM

from optimum_moeq import RouterNormConfig
from optimum_moeq.calibration import quantize_model_gptq

DECODERS = [t for t in FAMILIES if t != "switch_transformers"]


@pytest.mark.parametrize("model_type", DECODERS)
def test_streaming_gptq_equals_gptq_on_the_loaded_model(model_type, tmp_path):
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **FAMILIES[model_type])
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    ids = torch.randint(2, 64, (8, 24), generator=torch.Generator().manual_seed(0))
    options = dict(avg_bits=2.5, group_size=16, method="gptq", dataset=ids, nsamples=6, seqlen=24, attention_bits=4)
    streamed = AutoModelForCausalLM.from_pretrained(
        tmp_path, quantization_config=RouterNormConfig(**options), dtype=torch.float32
    )
    assert streamed.hf_quantizer._streamed == {}  # walked before loading, and every tensor loaded
    full = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    reference_config = RouterNormConfig(**options, allocation=streamed.config.quantization_config.allocation)
    quantize_model_gptq(full, reference_config, progress=False, quantize_linear=_same_linears(streamed))
    probe = ids[:2, :10]
    with torch.no_grad():
        assert torch.equal(streamed(probe).logits, full(probe).logits)


def _same_linears(quantized):
    """The dense linears that from_pretrained chose to quantize in ``quantized``."""
    from optimum_moeq.nn import PackedLinear

    chosen = {name for name, module in quantized.named_modules() if isinstance(module, PackedLinear)}
    return lambda name, module: name in chosen
