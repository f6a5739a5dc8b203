"""optimum-cli and accelerate placement: the rest of the Hugging Face stack."""

import json
import shutil
import subprocess

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from optimum_moeq import RouterNormConfig

TOKENS = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))


def _logits(model):
    with torch.no_grad():
        return model(TOKENS).logits


@pytest.mark.skipif(shutil.which("optimum-cli") is None, reason="optimum-cli is not installed")
def test_optimum_cli_moeq_is_the_moeq_command(tiny_mixtral_path, tmp_path):
    help_text = subprocess.run(["optimum-cli", "moeq", "--help"], capture_output=True, text=True, check=True).stdout
    assert help_text.startswith("usage: optimum-cli moeq")
    for command in ("allocate", "quantize", "eval", "push", "card"):
        assert f"    {command} " in help_text
    assert "moeq" in subprocess.run(["optimum-cli", "--help"], capture_output=True, text=True).stdout

    args = ["quantize", "--method", "rtn", str(tiny_mixtral_path), "OUT", "--avg-bits", "2.5", "--group-size", "32"]
    for tool, out in ((["optimum-cli", "moeq"], tmp_path / "a"), (["moeq"], tmp_path / "b")):
        run = subprocess.run([*tool, *[str(out) if a == "OUT" else a for a in args]], capture_output=True, text=True)
        assert run.returncode == 0, run.stderr[-2000:]
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    config_a, config_b = (json.loads((tmp_path / d / "config.json").read_text()) for d in "ab")
    assert config_a == config_b


@pytest.fixture(scope="module")
def saved_quantized(tiny_mixtral_path, tmp_path_factory):
    folder = tmp_path_factory.mktemp("saved")
    model = AutoModelForCausalLM.from_pretrained(
        tiny_mixtral_path, quantization_config=RouterNormConfig(method="rtn", avg_bits=2.5, group_size=32)
    )
    model.save_pretrained(folder)
    return folder, model.get_memory_footprint(), _logits(model)


def test_a_budget_of_1_3x_the_packed_size_keeps_everything_in_memory(saved_quantized, tiny_mixtral_path):
    folder, packed_bytes, logits = saved_quantized
    full_precision_bytes = AutoModelForCausalLM.from_pretrained(tiny_mixtral_path).get_memory_footprint()
    budget = int(1.3 * packed_bytes)
    assert budget < full_precision_bytes  # the budget would not hold the unquantized model
    model = AutoModelForCausalLM.from_pretrained(folder, device_map="auto", max_memory={"cpu": budget})
    assert set(getattr(model, "hf_device_map", {"": "cpu"}).values()) == {"cpu"}
    assert torch.equal(_logits(model), logits)
    # quantize-on-load is placed by the packed sizes too
    on_load = AutoModelForCausalLM.from_pretrained(
        tiny_mixtral_path,
        quantization_config=RouterNormConfig(method="rtn", avg_bits=2.5, group_size=32),
        device_map="auto",
        max_memory={"cpu": budget},
    )
    assert set(getattr(on_load, "hf_device_map", {"": "cpu"}).values()) == {"cpu"}


def test_a_smaller_budget_offloads_packed_experts_to_disk_with_the_same_logits(saved_quantized, tmp_path):
    folder, packed_bytes, logits = saved_quantized
    model = AutoModelForCausalLM.from_pretrained(
        folder, device_map="auto", max_memory={"cpu": packed_bytes // 2}, offload_folder=str(tmp_path / "offload")
    )
    placements = model.hf_device_map
    assert "disk" in placements.values() and "cpu" in placements.values()
    # offloaded weights stay on the meta device until accelerate's hooks bring them in
    assert any(p.device.type == "meta" for p in model.parameters())
    assert torch.equal(_logits(model), logits)


def _no_checkpoint_reads(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the checkpoint was read before the offload folder was checked")

    monkeypatch.setattr("optimum_moeq.quantizer.allocate_from_files", fail)


def test_an_offload_folder_that_cannot_be_written_fails_before_any_weight_is_read(
    saved_quantized, tiny_mixtral_path, tmp_path, monkeypatch
):
    (tmp_path / "a_file").write_text("")
    unwritable = tmp_path / "a_file" / "offload"  # below a regular file: not writable, even for root
    _no_checkpoint_reads(monkeypatch)
    for path, extra in (
        (tiny_mixtral_path, {"quantization_config": RouterNormConfig(method="rtn", avg_bits=2.5)}),
        (saved_quantized[0], {}),
    ):
        with pytest.raises(
            ValueError, match=r"offload_folder='.*a_file/offload' cannot be written \(.*a_file is a file\)"
        ):
            AutoModelForCausalLM.from_pretrained(
                path, device_map="auto", max_memory={"cpu": 10_000}, offload_folder=unwritable, **extra
            )


def test_quantize_on_load_with_experts_on_disk_and_no_offload_folder_fails_before_loading(
    saved_quantized, tiny_mixtral_path, monkeypatch
):
    packed_bytes = saved_quantized[1]
    loaded = []
    monkeypatch.setattr("optimum_moeq.quantizer.QuantizeExperts.convert", lambda *a, **k: loaded.append(1))
    message = r"device_map puts experts modules on disk \(model\.layers\.0\.mlp\.experts"
    with pytest.raises(ValueError, match=message):  # "auto": known once the allocation sizes the layers
        AutoModelForCausalLM.from_pretrained(
            tiny_mixtral_path,
            quantization_config=RouterNormConfig(method="rtn", avg_bits=2.5, group_size=32),
            device_map="auto",
            max_memory={"cpu": packed_bytes // 2},
        )
    assert not loaded
    _no_checkpoint_reads(monkeypatch)  # a map given as a dict: before the allocation scan
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "disk", "model.layers.1": "cpu", "model.norm": "cpu",
                  "model.rotary_emb": "cpu", "lm_head": "cpu"}  # fmt: skip
    with pytest.raises(ValueError, match=message):
        AutoModelForCausalLM.from_pretrained(
            tiny_mixtral_path,
            quantization_config=RouterNormConfig(method="rtn", avg_bits=2.5, group_size=32),
            device_map=device_map,
        )


def test_an_offload_folder_is_neither_probed_nor_created_when_nothing_can_go_to_disk(saved_quantized, tmp_path):
    (tmp_path / "a_file").write_text("")
    folder, _, logits = saved_quantized
    model = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu", offload_folder=tmp_path / "a_file" / "x")
    assert torch.equal(_logits(model), logits)
    model = AutoModelForCausalLM.from_pretrained(folder, device_map="auto", offload_folder=tmp_path / "unused")
    assert not (tmp_path / "unused").exists()  # transformers makes it only if something goes to disk
