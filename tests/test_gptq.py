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


def _textbook_gptq(weight, hessian, order, bits, group_size, damp_percent=0.01, grids_as_reached=False):
    """GPTQ as first written (Frantar et al., eq. 3), float64, unblocked: quantize the columns in
    ``order`` on grids fitted to the original weights (``grids_as_reached``: each run of
    ``group_size`` columns of ``order`` on a grid fitted to its weights as updated when reached);
    after each, spread its error over the columns left and remove it from the inverse Hessian."""
    w = weight.double().clone()
    h = hessian.double().clone()
    h += damp_percent * torch.diagonal(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)
    h_inv = torch.linalg.inv(h[order][:, order])
    w = w[:, order]
    grid = quantize_rtn(weight, bits, group_size)
    scale = grid.scale.double().repeat_interleave(group_size, 1)[:, order]
    zero = grid.zero.double().repeat_interleave(group_size, 1)[:, order]
    codes = torch.zeros_like(w, dtype=torch.int32)
    for j in range(w.shape[1]):
        if grids_as_reached and j % group_size == 0:
            grid = quantize_rtn(w[:, j : j + group_size].float(), bits, group_size)
            scale[:, j : j + group_size] = grid.scale.double()
            zero[:, j : j + group_size] = grid.zero.double()
        q = torch.round(w[:, j] / scale[:, j] + zero[:, j]).clamp(0, 2**bits - 1)
        codes[:, j] = q.int()
        error = (w[:, j] - (q - zero[:, j]) * scale[:, j]) / h_inv[j, j]
        w[:, j:] -= error[:, None] * h_inv[j, j:][None]
        h_inv = h_inv - h_inv[:, j : j + 1] @ h_inv[j : j + 1, :] / h_inv[j, j]
    restored = torch.empty_like(codes)
    restored[:, order] = codes
    return restored


@pytest.mark.parametrize("bits", [2, 3])
def test_act_order_is_textbook_gptq_in_order_of_decreasing_activation(bits):
    generator = torch.Generator().manual_seed(10 + bits)
    weight = torch.randn(16, 64, generator=generator) * 0.02
    x = _correlated_inputs(256, 64, generator) * torch.rand(64, generator=generator) * 3
    hessian = input_hessian(x)
    q = quantize_gptq(weight, hessian, bits, group_size=32, block_size=16, act_order=True)
    order = torch.argsort(torch.diagonal(hessian), descending=True, stable=True)
    assert not torch.equal(order, torch.arange(64))
    assert torch.equal(q.codes, _textbook_gptq(weight, hessian, order, bits, 32))
    grid = quantize_rtn(weight, bits, 32)  # static groups: grids from the weights before any update
    assert torch.equal(q.scale, grid.scale) and torch.equal(q.zero, grid.zero)


@pytest.mark.parametrize("bits", [2, 3])
def test_group_aware_order_is_textbook_gptq_group_by_group(bits):
    """act_order="groups": groups by their largest activation, columns within a group by theirs,
    each group's grid fitted as it is reached; a group's columns stay together."""
    generator = torch.Generator().manual_seed(30 + bits)
    weight = torch.randn(16, 96, generator=generator) * 0.02
    x = _correlated_inputs(256, 96, generator) * torch.rand(96, generator=generator) * 3
    hessian = input_hessian(x)
    diag = torch.diagonal(hessian)
    groups = torch.argsort(diag.reshape(3, 32).amax(-1), descending=True, stable=True)
    order = torch.cat([32 * g + torch.argsort(diag[32 * g : 32 * g + 32], descending=True, stable=True)
                       for g in groups.tolist()])  # fmt: skip
    assert not torch.equal(groups, torch.arange(3))
    q = quantize_gptq(weight, hessian, bits, group_size=32, block_size=16, act_order="groups")
    assert torch.equal(q.codes, _textbook_gptq(weight, hessian, order, bits, 32, grids_as_reached=True))
    with pytest.raises(ValueError, match=r"act_order='random' is not supported: allowed are False, True and 'groups'"):
        quantize_gptq(weight, hessian, bits, group_size=32, act_order="random")


@pytest.mark.parametrize("bits", [2, 3])
def test_act_order_lowers_the_output_error_when_inputs_differ_in_size(bits):
    generator = torch.Generator().manual_seed(20 + bits)
    weight = torch.randn(64, 256, generator=generator) * 0.02
    x = torch.randn(1024, 256, generator=generator) * torch.rand(256, generator=generator).pow(4) * 10
    hessian = input_hessian(x)
    in_order = _output_error(weight, x, quantize_gptq(weight, hessian, bits, 128))
    by_activation = _output_error(weight, x, quantize_gptq(weight, hessian, bits, 128, act_order=True))
    assert by_activation < 0.97 * in_order


def test_act_order_on_a_diagonal_hessian_is_rtn():
    """Uncorrelated inputs: no column's error can be spread, so GPTQ in any order is rtn."""
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(8, 64, generator=generator)
    hessian = torch.diag(torch.rand(64, generator=generator, dtype=torch.float64) + 0.1)
    q, rtn = quantize_gptq(weight, hessian, 2, 32, act_order=True), quantize_rtn(weight, 2, 32)
    assert torch.equal(q.codes, rtn.codes) and torch.equal(q.scale, rtn.scale)


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
    with pytest.raises(ValueError, match="fewer than one window of 64"):
        calibration_tokens([[1, 2, 3]], None, nsamples=2, seqlen=64)
    with pytest.raises(ValueError, match="needs a tokenizer"):
        calibration_tokens(["some text"], None, nsamples=1, seqlen=2)


def _calibration_ids():
    return torch.randint(0, 128, (16, 32), generator=torch.Generator().manual_seed(0))


def test_gptq_from_pretrained_quantizes_every_expert_and_reports_fallbacks(tiny_mixtral_path, tmp_path):
    config = RouterNormConfig(
        avg_bits=2.5, group_size=32, method="gptq", dataset=_calibration_ids(), nsamples=8, seqlen=32,
        min_expert_tokens=48, expert_hessian="routed",
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
        assert report.all_tokens_fallback[name] == [e for e, c in enumerate(counts) if c < 48]
        assert report.hessian_tokens[name] == [c if c >= 48 else 8 * 32 for c in counts]  # never rtn
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
    hqq = AutoModelForCausalLM.from_pretrained(
        tiny_mixtral_path, quantization_config=RouterNormConfig(method="rtn", group_size=32)
    )
    # 512 tokens: every expert reaches 16 routed tokens (32, the default, depends on the first layer's rounding)
    gptq_config = RouterNormConfig(group_size=32, method="gptq", nsamples=16, seqlen=32, expert_hessian="routed",
                                   min_expert_tokens=16)  # fmt: skip
    report = quantize_model_gptq(full, gptq_config, tokens, progress=False)
    assert not any(report.all_tokens_fallback.values())
    with torch.no_grad():
        errors = {name: (m(tokens).logits - reference).norm().item() for name, m in (("gptq", full), ("hqq", hqq))}
    assert errors["gptq"] < errors["hqq"]


class _ByteTokenizer:
    """Bytes modulo the tiny model's vocabulary of 128."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [b % 128 for b in text.encode("utf-8")]}


def test_gptq_without_data_calibrates_on_the_builtin_text(tiny_mixtral_path):
    import pydoc_data.topics

    tokens = calibration_tokens(None, _ByteTokenizer(), nsamples=4, seqlen=24)
    text = "\n\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
    ids = _ByteTokenizer()(text)["input_ids"]
    assert len(ids) > 400_000
    joined = ",".join(map(str, ids))
    assert all(",".join(map(str, window.tolist())) in joined for window in tokens)  # windows of that text
    common = dict(method="gptq", group_size=32, nsamples=4, seqlen=24, tokenizer=_ByteTokenizer())
    default = AutoModelForCausalLM.from_pretrained(tiny_mixtral_path, quantization_config=RouterNormConfig(**common))
    named = AutoModelForCausalLM.from_pretrained(
        tiny_mixtral_path, quantization_config=RouterNormConfig(**common, dataset="builtin")
    )
    assert sum(default.hf_quantizer.gptq_report.tokens_per_expert["model.layers.0.mlp.experts"]) == 4 * 24 * 2
    probe = torch.arange(16)[None]
    with torch.no_grad():
        assert torch.equal(default(probe).logits, named(probe).logits)


class _FakeHubDataset(dict):
    def select(self, indices):
        return {"text": [self["text"][i] for i in indices]}

    def __len__(self):
        return len(self["text"])


@pytest.mark.parametrize("name", ["wikitext2", "c4"])
def test_named_hub_datasets_load_through_the_datasets_library(monkeypatch, name):
    import datasets

    calls = []

    def load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        return _FakeHubDataset(text=[f"{name} document {i} " * 8 for i in range(40)])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    tokens = calibration_tokens(name, _ByteTokenizer(), nsamples=3, seqlen=32)
    assert tokens.shape == (3, 32)
    args, kwargs = calls[0]
    assert args[0] == ("wikitext" if name == "wikitext2" else "allenai/c4") and kwargs["split"] == "train"
    assert bytes(tokens[0].tolist()).decode().count(name[:4]) >= 1  # text of the loaded documents


def test_named_hub_dataset_offline_says_what_to_do(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'wikitext' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ConnectionError, match="dataset='wikitext2' could not be loaded from the Hugging Face Hub"):
        calibration_tokens("wikitext2", _ByteTokenizer(), nsamples=1, seqlen=8)
    with pytest.raises(
        ConnectionError, match="this machine may be offline: .* or dataset='builtin' \\(no download\\)"
    ):
        calibration_tokens("c4", _ByteTokenizer(), nsamples=1, seqlen=8)


@pytest.mark.parametrize(
    ("dataset", "message"),
    [
        ([500] * 600, r"calibration token ids span 500..500; this model's vocabulary is 0..127"),
        ([[1, 2, 3]], r"the calibration data has 3 tokens, fewer than one window of 64 \(seqlen"),
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


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("bits", [1, 2, 3])
def test_batched_gptq_equals_one_expert_at_a_time(bits, act_order):
    """All experts of a width at once ([E, N, K] weights, [E, K, K] Hessians) give each expert's
    own GPTQ result, a dead input (never active) included."""
    generator = torch.Generator().manual_seed(bits)
    weights = torch.randn(3, 24, 64, generator=generator) * 0.02
    inputs = torch.randn(3, 200, 64, generator=generator)
    inputs[1, :, 5] = 0.0
    hessians = torch.stack([input_hessian(x) for x in inputs])
    batched = quantize_gptq(weights, hessians, bits, group_size=32, act_order=act_order)
    assert batched.codes.shape == (3, 24, 64) and batched.scale.shape == (3, 24, 2)
    for e in range(3):
        single = quantize_gptq(weights[e], hessians[e], bits, group_size=32, act_order=act_order)
        assert torch.equal(batched.codes[e], single.codes)
        assert torch.equal(batched.scale[e], single.scale) and torch.equal(batched.zero[e], single.zero)
    with pytest.raises(ValueError, match=r"hessian has shape \(2, 64, 64\), expected \(3, 64, 64\)"):
        quantize_gptq(weights, hessians[:2], bits, group_size=32)


def test_weighted_hessian_is_the_weighted_mean_of_outer_products():
    from optimum_moeq.calibration import _weighted_hessian

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(10, 6, generator=generator)
    w = torch.rand(10, generator=generator)
    w[3] = 0.0
    expected = 2 * sum(w[t].double() * torch.outer(x[t].double(), x[t].double()) for t in range(10)) / w.double().sum()
    torch.testing.assert_close(_weighted_hessian(x.__getitem__, w), expected)
    torch.testing.assert_close(_weighted_hessian(x.__getitem__, torch.ones(10)), input_hessian(x))


def test_weighted_hessian_in_token_chunks_equals_the_whole(monkeypatch):
    from optimum_moeq import calibration

    generator = torch.Generator().manual_seed(1)
    x = torch.randn(50, 8, generator=generator)
    w = torch.rand(50, generator=generator) * (torch.rand(50, generator=generator) > 0.3)
    asked = []

    def rows(tokens):
        asked.append(tokens.numel())
        return x[tokens]

    whole = calibration._weighted_hessian(rows, w)
    monkeypatch.setattr(calibration, "HESSIAN_CHUNK_TOKENS", 7)
    asked.clear()
    chunked = calibration._weighted_hessian(rows, w)
    kept = int((w > 0).sum())
    assert asked == [7] * (kept // 7) + ([kept % 7] if kept % 7 else [])  # never more than a chunk at once
    torch.testing.assert_close(chunked, whole, rtol=1e-12, atol=1e-12)
    x64, w64 = x.double(), w.double()
    torch.testing.assert_close(chunked, 2 * (x64.T * w64) @ x64 / w64.sum(), rtol=1e-12, atol=1e-12)
    empty = calibration._weighted_hessian(rows, torch.zeros(50))
    assert empty.shape == (8, 8) and empty.dtype == torch.float64 and not empty.any()


@pytest.mark.parametrize("expert_hessian", ["routed", "all", "weighted"])
def test_every_expert_hessian_mode_calibrates_every_expert(tiny_mixtral_path, expert_hessian):
    tokens = _calibration_ids()
    full = AutoModelForCausalLM.from_pretrained(tiny_mixtral_path)
    with torch.no_grad():
        reference = full(tokens).logits
    common = dict(avg_bits=2.5, group_size=32)
    rtn = AutoModelForCausalLM.from_pretrained(
        tiny_mixtral_path, quantization_config=RouterNormConfig(method="rtn", **common)
    )
    config = RouterNormConfig(
        **common, method="gptq", dataset=tokens, nsamples=16, seqlen=32, expert_hessian=expert_hessian,
        min_expert_tokens=10**6,  # "routed": every expert falls back to every token
    )  # fmt: skip
    gptq = AutoModelForCausalLM.from_pretrained(tiny_mixtral_path, quantization_config=config)
    report = gptq.hf_quantizer.gptq_report
    for name, counts in report.hessian_tokens.items():
        assert counts == [16 * 32] * 8  # every token reaches every expert's Hessian (router probabilities > 0)
        assert report.all_tokens_fallback[name] == (list(range(8)) if expert_hessian == "routed" else [])
    with torch.no_grad():
        errors = {kind: (m(tokens).logits - reference).norm().item() for kind, m in (("gptq", gptq), ("rtn", rtn))}
    assert errors["gptq"] < errors["rtn"]


def test_expert_hessian_is_checked():
    with pytest.raises(ValueError, match=r"expert_hessian='some' is not supported: allowed are \('routed', 'all'"):
        RouterNormConfig(method="gptq", expert_hessian="some")


def test_gptq_quantizes_attention_with_gptq_too(tiny_mixtral_path):
    """With attention_bits, GPTQ quantizes the attention linears from their own inputs: layer 0's
    q_proj (whose inputs nothing quantized precedes) has a lower output error on them than rtn."""
    from optimum_moeq.nn import PackedLinear

    tokens = _calibration_ids()
    full = AutoModelForCausalLM.from_pretrained(tiny_mixtral_path)
    seen = []
    hook = full.model.layers[0].self_attn.q_proj.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    with torch.no_grad():
        full(tokens)
    hook.remove()
    x = torch.cat(seen).reshape(-1, seen[0].shape[-1]).double()
    weight = full.model.layers[0].self_attn.q_proj.weight.detach().double()
    config = RouterNormConfig(group_size=32, method="gptq", dataset=tokens, nsamples=16, seqlen=32, attention_bits=3)
    gptq = AutoModelForCausalLM.from_pretrained(tiny_mixtral_path, quantization_config=config)
    q_proj = gptq.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, PackedLinear) and q_proj.bits == 3
    assert not isinstance(gptq.model.layers[0].mlp.gate, PackedLinear)  # routers stay full precision
    rtn = quantize_rtn(weight.float(), 3, 32)
    errors = {
        "gptq": (x @ (q_proj.dequantized().double() - weight).T).pow(2).mean().item(),
        "rtn": (x @ (dequantize(rtn.codes, rtn.scale, rtn.zero).double() - weight).T).pow(2).mean().item(),
    }
    assert errors["gptq"] < 0.9 * errors["rtn"]


def test_measured_ranking_gives_the_high_bits_to_the_largest_measured_gains(tiny_mixtral_path):
    """Layer 0 (its inputs are exact: nothing quantized precedes it): the experts given 3 bits are
    those whose output error on their routed tokens falls most from 2 to 3 bits, recomputed here
    in float64 from the full-precision model's own routing."""
    tokens = _calibration_ids()
    full = AutoModelForCausalLM.from_pretrained(tiny_mixtral_path)
    seen = []
    experts = full.model.layers[0].mlp.experts
    hook = experts.register_forward_pre_hook(lambda m, args: seen.append((args[0], args[1])))
    with torch.no_grad():
        for sample in tokens:
            full(sample[None])
    hook.remove()
    hidden = torch.cat([h for h, _ in seen]).double()
    index = torch.cat([i for _, i in seen])

    def error(weight, x, bits):
        q = quantize_rtn(weight.float(), bits, 32)
        delta = dequantize(q.codes, q.scale, q.zero).double() - weight.double()
        return (x @ delta.T).pow(2).sum().item()

    gains = []
    for e in range(8):
        x = hidden[(index == e).any(dim=-1)]
        gate_up, down = experts.gate_up_proj[e].detach().double(), experts.down_proj[e].detach().double()
        gate, up = (x @ gate_up.T).chunk(2, dim=-1)
        inner = torch.nn.functional.silu(gate) * up
        gains.append(error(gate_up, x, 2) - error(gate_up, x, 3) + error(down, inner, 2) - error(down, inner, 3))
    config = RouterNormConfig(
        avg_bits=2.5, group_size=32, method="gptq", dataset=tokens, nsamples=16, seqlen=32, ranking="measured",
        min_expert_tokens=1,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(tiny_mixtral_path, quantization_config=config)
    bits = model.config.quantization_config.allocation["model.layers.0.mlp.experts"]
    assert sorted(bits) == [2] * 4 + [3] * 4
    assert model.get_submodule("model.layers.0.mlp.experts").expert_bits == bits
    high = [gains[e] for e in range(8) if bits[e] == 3]
    low = [gains[e] for e in range(8) if bits[e] == 2]
    assert min(high) >= max(low)
    assert model.hf_quantizer.allocation.bits == model.config.quantization_config.allocation


def test_measured_ranking_needs_calibration():
    with pytest.raises(ValueError, match="ranking='measured' measures each expert on calibration data: it needs"):
        RouterNormConfig(method="rtn", ranking="measured")


def test_the_default_method_is_gptq_on_the_builtin_text(tiny_mixtral_path, tmp_path):
    """No method and no dataset: GPTQ (streamed) on the built-in text, recorded in config.json."""
    config = RouterNormConfig(avg_bits=2.5, group_size=32, nsamples=4, seqlen=24, tokenizer=_ByteTokenizer())
    model = AutoModelForCausalLM.from_pretrained(tiny_mixtral_path, quantization_config=config)
    assert model.config.quantization_config.method == "gptq"
    assert model.hf_quantizer._streamed == {}  # streamed before loading
    assert sum(model.hf_quantizer.gptq_report.tokens_per_expert["model.layers.0.mlp.experts"]) == 4 * 24 * 2
    model.save_pretrained(tmp_path)
    assert '"method": "gptq"' in (tmp_path / "config.json").read_text()


def test_the_default_method_without_a_tokenizer_says_what_to_pass(tiny_mixtral_path):
    with pytest.raises(ValueError, match="calibrates on text, which needs the model's tokenizer.*or method='rtn'"):
        AutoModelForCausalLM.from_pretrained(tiny_mixtral_path, quantization_config=RouterNormConfig(group_size=32))


def test_the_default_method_is_rtn_where_gptq_does_not_apply(tmp_path):
    from transformers import AutoModelForSeq2SeqLM

    save_tiny_switch(tmp_path)
    model = AutoModelForSeq2SeqLM.from_pretrained(tmp_path, quantization_config=RouterNormConfig(group_size=16))
    assert model.config.quantization_config.method == "rtn"


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_may_factor_in_the_callers_hessian_with_the_same_result(act_order):
    generator = torch.Generator().manual_seed(3)
    weights = torch.randn(2, 16, 64, generator=generator)
    inputs = torch.randn(2, 200, 64, generator=generator) * torch.rand(64, generator=generator)
    inputs[:, :, 7] = 0.0  # a dead input
    hessians = torch.stack([input_hessian(x) for x in inputs])
    kept = hessians.clone()
    copied = quantize_gptq(weights, hessians, 3, 32, act_order=act_order)
    assert torch.equal(hessians, kept)  # by default the caller's Hessian is left as it was
    given = quantize_gptq(weights, hessians, 3, 32, act_order=act_order, overwrite_hessian=True)
    assert not torch.equal(hessians, kept)  # its buffer held the factorization
    for field in ("codes", "scale", "zero"):
        assert torch.equal(getattr(copied, field), getattr(given, field))


def test_the_hessian_is_permuted_and_symmetrized_in_place_by_chunks(monkeypatch):
    """The factorization's K x K passes work chunk by chunk in the Hessian's own memory (no K x K
    temporary); with chunks of 5 rows they must still give h[order][:, order] and its lower triangle
    mirrored, exactly."""
    from optimum_moeq.quant import gptq

    monkeypatch.setattr(gptq, "_chunk_rows", lambda k: 5)
    generator = torch.Generator().manual_seed(7)
    h = torch.randn(2, 37, 37, generator=generator, dtype=torch.float64)  # not symmetric: every entry counts
    order = torch.stack([torch.randperm(37, generator=generator) for _ in range(2)])
    expected = torch.stack([h[e][order[e]][:, order[e]] for e in range(2)])
    buffer = h.clone()
    pointer = buffer.data_ptr()
    gptq._permute_in_place(buffer, order)
    assert torch.equal(buffer, expected) and buffer.data_ptr() == pointer
    gptq._symmetrize_from_lower(buffer)
    lower = expected.tril()
    assert torch.equal(buffer, lower + lower.tril(-1).mT) and buffer.data_ptr() == pointer
