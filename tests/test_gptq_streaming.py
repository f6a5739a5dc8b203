"""Streaming GPTQ (the checkpoint walked one layer at a time before loading) gives the same model
as GPTQ over the fully loaded full-precision model, for every decoder-only family."""

from unittest import mock

import pytest
import torch
from safetensors import safe_open
from test_families import FAMILIES
from transformers import AutoConfig, AutoModelForCausalLM, core_model_loading

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
    read = []
    materialize = core_model_loading._materialize_copy
    counted = lambda t, *a: read.append(1) or materialize(t, *a)  # noqa: E731
    with mock.patch.object(core_model_loading, "_materialize_copy", counted):
        streamed = AutoModelForCausalLM.from_pretrained(
            tmp_path, quantization_config=RouterNormConfig(**options), dtype=torch.float32
        )
    assert streamed.hf_quantizer._streamed == {}  # walked before loading, and every tensor loaded
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        experts_keys = [k for k in f.keys() if ".experts." in k]
        assert experts_keys and len(read) == len(f.keys()) - len(experts_keys)  # the walk read the experts once
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


@pytest.mark.parametrize(
    "device_map, expected",
    [
        (None, "cpu"), ("cpu", "cpu"), ({"": "cpu"}, "cpu"), ({"model.embed_tokens": "disk"}, "cpu"),
        (1, "cuda:1"), ("cuda:1", "cuda:1"), (torch.device("cuda", 1), "cuda:1"), ("cuda", "cuda:0"),
        ("auto", "cuda:0"), ({"model.embed_tokens": "cpu", "model.layers": 1, "lm_head": "disk"}, "cuda:1"),
        ({"model": "cuda:1"}, "cuda:1"),
    ],
)  # fmt: skip
def test_streaming_gptq_computes_on_the_first_gpu_of_the_device_map(device_map, expected, monkeypatch):
    from optimum_moeq import calibration_stream

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert calibration_stream.calibration_device(device_map) == torch.device(expected)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert calibration_stream.calibration_device(device_map) == torch.device("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the streaming walk on a GPU needs one")
def test_streaming_gptq_on_the_gpu_matches_the_cpu_walk(tiny_mixtral_path):
    from transformers import AutoModelForCausalLM

    from optimum_moeq import RouterNormConfig

    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    models = {}
    for device_map in ("cpu", "cuda"):
        config = RouterNormConfig(avg_bits=2.5, group_size=32, dataset=ids, nsamples=4, seqlen=32)
        models[device_map] = AutoModelForCausalLM.from_pretrained(
            tiny_mixtral_path, quantization_config=config, device_map=device_map, dtype=torch.float32
        )
    cpu_state, gpu_state = models["cpu"].state_dict(), models["cuda"].state_dict()
    assert cpu_state.keys() == gpu_state.keys()
    codes = [k for k in cpu_state if k.endswith("_q2")]
    assert codes and all(gpu_state[k].device.type == "cuda" for k in codes)
    # float64 Hessians on both; GPU arithmetic differs by rounding only, so nearly every code agrees
    same = sum(int((cpu_state[k] == gpu_state[k].cpu()).sum()) for k in codes)
    assert same / sum(cpu_state[k].numel() for k in codes) > 0.95


def test_the_walk_fuses_per_expert_tensors_in_place_and_names_a_shape_mismatch():
    from optimum_moeq.calibration_stream import _read_checkpoint_tensor
    from optimum_moeq.models.mixtral import MIXTRAL

    g = torch.Generator().manual_seed(0)
    base = "model.layers.0.block_sparse_moe.experts"  # Mixtral's names on disk (w1 gate, w3 up, w2 down)
    reader = {f"{base}.{e}.{p}.weight": torch.randn(6, 4, generator=g) for e in range(3) for p in ("w1", "w3")}
    gate_up = torch.empty(3, 12, 4)
    _read_checkpoint_tensor(reader, MIXTRAL, "model.layers.0.mlp.experts.gate_up_proj", gate_up)
    expected = torch.stack([torch.cat([reader[f"{base}.{e}.w1.weight"], reader[f"{base}.{e}.w3.weight"]])
                            for e in range(3)])  # fmt: skip
    assert torch.equal(gate_up, expected)
    reader[f"{base}.1.w3.weight"] = torch.randn(6, 5, generator=g)
    with pytest.raises(ValueError, match=r"experts\.1\.w3\.weight: the checkpoint holds \(6, 5\), the model \(6, 4\)"):
        _read_checkpoint_tensor(reader, MIXTRAL, "model.layers.0.mlp.experts.gate_up_proj", gate_up)
    reader[f"{base}.1.w3.weight"] = torch.randn(5, 4, generator=g)
    with pytest.raises(ValueError, match="the checkpoint's experts give 11 rows, the model 12"):
        _read_checkpoint_tensor(reader, MIXTRAL, "model.layers.0.mlp.experts.gate_up_proj", gate_up)
    reader[f"{base}.1.w3.weight"] = torch.randn(6, 4, generator=g)
    with pytest.raises(ValueError, match="the checkpoint holds 3 experts, the model 4"):
        _read_checkpoint_tensor(reader, MIXTRAL, "model.layers.0.mlp.experts.gate_up_proj", torch.empty(4, 12, 4))
    with pytest.raises(KeyError, match="no tensor for model.layers.0.mlp.experts.down_proj"):
        _read_checkpoint_tensor(reader, MIXTRAL, "model.layers.0.mlp.experts.down_proj", torch.empty(3, 4, 6))
