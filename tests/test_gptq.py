"""GPTQ: per-weight solver against independent output errors, and the model-level pass."""

import pytest
import torch
from conftest import save_tiny_switch
from transformers import AutoModelForCausalLM

from optimum_moeq import MixedBitExperts, RouterNormConfig
from optimum_moeq.calibration import quantize_model_gptq
from optimum_moeq.calibration_data import calibration_tokens
from optimum_moeq.quant import dequantize, quantize_hqq, quantize_rtn
from optimum_moeq.quant.gptq import input_hessian, quantize_gptq


def _output_error(weight, x, q):
    restored = dequantize(q.codes, q.scale, q.zero).double()
    return ((x.double() @ (restored - weight.double()).T).pow(2).mean()).item()


def _correlated_inputs(n, k, generator):
    mixing = torch.randn(k, k, generator=generator) / k**0.5
    scales = torch.logspace(0, -2, k)  # a few directions dominate, as in real activations
    return (torch.randn(n, k, generator=generator) * scales) @ mixing


@pytest.mark.parametrize("bits", [2, 3])
def test_gptq_output_error_is_below_hqq_and_rtn_on_correlated_inputs(bits):
    generator = torch.Generator().manual_seed(bits)
    weight = torch.randn(48, 128, generator=generator) * 0.02
    x = _correlated_inputs(512, 128, generator)
    gptq = quantize_gptq(weight, input_hessian(x), bits, group_size=32)
    errors = {
        "gptq": _output_error(weight, x, gptq),
        "hqq": _output_error(weight, x, quantize_hqq(weight, bits, 32)),
        "rtn": _output_error(weight, x, quantize_rtn(weight, bits, 32)),
    }
    assert errors["gptq"] < errors["hqq"] < errors["rtn"]
    assert gptq.codes.min() >= 0 and gptq.codes.max() < 2**bits
    assert gptq.scale.dtype == torch.float16 and gptq.scale.shape == (48, 4)


def test_gptq_is_exact_on_weights_already_on_the_grid():
    codes = torch.randint(0, 8, (8, 64))
    codes[:, ::32] = 0
    codes[:, 1::32] = 7
    weight = (codes.float() - 3.0) * 0.25
    x = _correlated_inputs(256, 64, torch.Generator().manual_seed(0))
    q = quantize_gptq(weight, input_hessian(x), 3, group_size=32)
    assert torch.equal(dequantize(q.codes, q.scale, q.zero), weight)


def test_calibration_tokens_from_strings_file_and_ids(tmp_path):
    class CharTokenizer:
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) % 128 for c in text]}

    text = "the quick brown fox jumps over the lazy dog " * 20
    (tmp_path / "calib.txt").write_text(text)
    from_file = calibration_tokens(str(tmp_path / "calib.txt"), CharTokenizer(), nsamples=4, seqlen=16)
    from_strings = calibration_tokens([text], CharTokenizer(), nsamples=4, seqlen=16)
    assert from_file.shape == (4, 16) and torch.equal(from_file, from_strings)
    assert calibration_tokens([[1, 2, 3, 4, 5]], None, nsamples=2, seqlen=5).tolist() == [[1, 2, 3, 4, 5]] * 2
    assert calibration_tokens([1, 2, 3, 4, 5], None, nsamples=2, seqlen=5).tolist() == [[1, 2, 3, 4, 5]] * 2
    with pytest.raises(ValueError, match="fewer than seqlen=64"):
        calibration_tokens([[1, 2, 3]], None, nsamples=2, seqlen=64)
    with pytest.raises(ValueError, match="needs a tokenizer"):
        calibration_tokens(["some text"], None, nsamples=1, seqlen=2)


def _calibration_ids():
    return torch.randint(0, 128, (16, 32), generator=torch.Generator().manual_seed(0))


def test_gptq_from_pretrained_quantizes_every_expert_and_reports_fallbacks(tiny_mixtral_path, tmp_path):
    config = RouterNormConfig(
        avg_bits=2.5, group_size=32, method="gptq", dataset=_calibration_ids(), nsamples=8, seqlen=32,
        min_expert_tokens=48,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(tiny_mixtral_path, quantization_config=config)
    assert not any(m.training for m in model.modules())  # replacements made after eval() are in eval mode too
    report = model.hf_quantizer.gptq_report
    for layer in range(2):
        name = f"model.layers.{layer}.mlp.experts"
        module = model.get_submodule(name)
        assert isinstance(module, MixedBitExperts)
        assert module.expert_bits == model.config.quantization_config.allocation[name]
        counts = report.tokens_per_expert[name]
        assert sum(counts) == 8 * 32 * 2  # every (token, k) pair reached one expert
        assert report.calibration_free[name] == [e for e, c in enumerate(counts) if c < 48]
    tokens = _calibration_ids()[:2]
    with torch.no_grad():
        logits = model(tokens).logits
    model.save_pretrained(tmp_path)
    saved = (tmp_path / "config.json").read_text()
    assert '"method": "gptq"' in saved and '"dataset": null' in saved
    with torch.no_grad():
        assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path)(tokens).logits, logits)


def test_gptq_on_a_loaded_model_lowers_the_error_on_its_calibration_data(tiny_mixtral_path):
    tokens = _calibration_ids()
    full = AutoModelForCausalLM.from_pretrained(tiny_mixtral_path)
    with torch.no_grad():
        reference = full(tokens).logits
    hqq = AutoModelForCausalLM.from_pretrained(tiny_mixtral_path, quantization_config=RouterNormConfig(group_size=32))
    gptq_config = RouterNormConfig(group_size=32, method="gptq", nsamples=16, seqlen=32, min_expert_tokens=1)
    report = quantize_model_gptq(full, gptq_config, tokens, progress=False)
    assert not any(report.calibration_free.values())
    with torch.no_grad():
        errors = {name: (m(tokens).logits - reference).norm().item() for name, m in (("gptq", full), ("hqq", hqq))}
    assert errors["gptq"] < errors["hqq"]


def test_gptq_without_data_is_refused(tiny_mixtral_path):
    with pytest.raises(ValueError, match="method='gptq' needs calibration data"):
        AutoModelForCausalLM.from_pretrained(
            tiny_mixtral_path, quantization_config=RouterNormConfig(method="gptq", group_size=32)
        )


@pytest.mark.parametrize(
    ("dataset", "message"),
    [
        ([500] * 600, r"calibration token ids span 500..500; this model's vocabulary is 0..127"),
        ([[1, 2, 3]], r"the calibration data has 3 tokens, fewer than seqlen=512"),
        ([[0] * 300, [200] * 300], r"calibration token ids span 0..200; this model's vocabulary is 0..127"),
        ("missing.txt", r"dataset='missing.txt' is not a local text file"),
    ],
)
def test_bad_calibration_data_is_refused_before_weights_load(tiny_mixtral_path, monkeypatch, dataset, message):
    import optimum_moeq.quantizer as quantizer

    monkeypatch.setattr(quantizer, "allocate_from_files", lambda *a, **k: pytest.fail("the checkpoint was read"))
    with pytest.raises(ValueError, match=message):
        AutoModelForCausalLM.from_pretrained(
            tiny_mixtral_path, quantization_config=RouterNormConfig(method="gptq", group_size=32, dataset=dataset)
        )


def test_gptq_on_an_encoder_decoder_is_refused_before_weights_load(tmp_path):
    from transformers import AutoModelForSeq2SeqLM

    save_tiny_switch(tmp_path)
    quantization = RouterNormConfig(group_size=16, method="gptq", dataset=_calibration_ids())
    with pytest.raises(ValueError, match="method='gptq' supports decoder-only gated MoE models, not 'switch"):
        AutoModelForSeq2SeqLM.from_pretrained(tmp_path, quantization_config=quantization)
