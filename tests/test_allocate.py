"""allocate(): the streaming pass over the checkpoint, and reference routers."""

import json
import shutil

import pytest
import torch
from conftest import save_tiny_switch, tiny_switch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

import optimum_moeq.allocation.checkpoint as checkpoint
from optimum_moeq import RouterNormConfig, allocate
from optimum_moeq.models import get_adapter

CONFIG = RouterNormConfig(method="rtn", avg_bits=2.5, group_size=32)


def test_allocate_reads_only_routers_and_gate_projections(tiny_mixtral_path, monkeypatch):
    read = []
    real_safe_open = checkpoint.safe_open

    class RecordingHandle:
        def __init__(self, handle):
            self.handle = handle

        def keys(self):
            return self.handle.keys()

        def get_tensor(self, name):
            read.append(name)
            return self.handle.get_tensor(name)

        def get_slice(self, name):
            read.append(name)
            return self.handle.get_slice(name)

    class RecordingOpen:
        def __init__(self, *args, **kwargs):
            self.opened = real_safe_open(*args, **kwargs)

        def __enter__(self):
            return RecordingHandle(self.opened.__enter__())

        def __exit__(self, *exc):
            return self.opened.__exit__(*exc)

    monkeypatch.setattr(checkpoint, "safe_open", RecordingOpen)
    allocation = allocate(tiny_mixtral_path, CONFIG, progress=False)
    assert sorted(read) == sorted(
        [f"model.layers.{i}.block_sparse_moe.gate.weight" for i in range(2)]
        + [f"model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight" for i in range(2) for e in range(8)]
    )
    loaded = AutoModelForCausalLM.from_pretrained(tiny_mixtral_path, quantization_config=CONFIG)
    assert allocation.bits == loaded.config.quantization_config.allocation


def test_sharded_and_fused_checkpoints_give_the_same_allocation(tiny_mixtral_path, tmp_path):
    expected = allocate(tiny_mixtral_path, CONFIG, progress=False).bits
    model = AutoModelForCausalLM.from_pretrained(tiny_mixtral_path)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert allocate(tmp_path / "sharded", CONFIG, progress=False).bits == expected

    # the layout transformers holds in memory: fused gate_up [E, 2I, H], gate rows first
    tensors = load_file(tiny_mixtral_path / "model.safetensors")
    fused = {k: v for k, v in tensors.items() if ".experts." not in k}
    for layer in range(2):
        prefix = f"model.layers.{layer}.block_sparse_moe.experts"
        gate = torch.stack([tensors[f"{prefix}.{e}.w1.weight"] for e in range(8)])
        up = torch.stack([tensors[f"{prefix}.{e}.w3.weight"] for e in range(8)])
        fused[f"model.layers.{layer}.mlp.experts.gate_up_proj"] = torch.cat([gate, up], dim=1)
    (tmp_path / "fused").mkdir()
    save_file(fused, tmp_path / "fused" / "model.safetensors")
    shutil.copy(tiny_mixtral_path / "config.json", tmp_path / "fused")
    assert allocate(tmp_path / "fused", CONFIG, progress=False).bits == expected
    for folder in (tiny_mixtral_path, tmp_path / "fused"):
        _check_read_ahead_ranges(folder)


def test_the_scan_keeps_one_shard_mapped_at_a_time(tiny_mixtral_path, tmp_path, monkeypatch):
    AutoModelForCausalLM.from_pretrained(tiny_mixtral_path).save_pretrained(tmp_path, max_shard_size="100KB")
    assert len(checkpoint.safetensors_files(tmp_path)) > 2
    open_now, most = set(), []
    real_safe_open = checkpoint.safe_open

    class CountingSafeOpen:
        def __init__(self, path, framework):
            self.handle = real_safe_open(path, framework=framework)

        def __enter__(self):
            open_now.add(id(self))
            most.append(len(open_now))
            return self.handle.__enter__()

        def __exit__(self, *exc):
            open_now.discard(id(self))
            return self.handle.__exit__(*exc)

    monkeypatch.setattr(checkpoint, "safe_open", CountingSafeOpen)
    assert allocate(tmp_path, CONFIG, progress=False).bits == allocate(tiny_mixtral_path, CONFIG, progress=False).bits
    assert max(most) == 1 and not open_now


def _check_read_ahead_ranges(folder):
    """The byte range the scan asks the kernel to read ahead is where that tensor's bytes are."""
    files = checkpoint.safetensors_files(folder)
    jobs = checkpoint._read_jobs(files, get_adapter(AutoConfig.from_pretrained(folder)))
    tensors = load_file(files[0])
    assert len(jobs) == 2 * (1 + 8)  # per layer: the router and 8 experts' gate rows
    for job in jobs:
        expected = tensors[job.match.string]
        if job.expert is not None:
            expected = expected[job.expert, : expected.shape[1] // 2]
        with open(job.path, "rb") as f:
            f.seek(job.byte_range[0])
            on_disk = f.read(job.byte_range[1] - job.byte_range[0])
        assert on_disk == expected.contiguous().view(torch.uint8).numpy().tobytes()


REFERENCE_NORMS = [1.0, 2.0, 0.5, 1.5, 1.2, 0.8, 2.5, 1.1]
CHANGES = [0.30, -0.20, 0.90, 0.05, 0.60, 0.40, -0.10, 0.70]  # smallest change: experts 1, 6, 3, 0


def _set_router_norms(model, norms):
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith("router.classifier"):
                w = module.weight
                w.copy_(w / w.norm(dim=1, keepdim=True) * torch.tensor(norms)[:, None])


@pytest.fixture(scope="module")
def switch_pair(tmp_path_factory):
    """A "pre-trained" Switch model and a "fine-tuned" one whose router rows moved by CHANGES."""
    torch.manual_seed(0)
    model = tiny_switch(num_experts=8)
    _set_router_norms(model, REFERENCE_NORMS)
    reference = tmp_path_factory.mktemp("switch-base")
    model.save_pretrained(reference)
    _set_router_norms(model, [n + c for n, c in zip(REFERENCE_NORMS, CHANGES)])
    finetuned = tmp_path_factory.mktemp("switch-finetuned")
    model.save_pretrained(finetuned)
    return reference, finetuned


def test_reference_router_ranks_by_norm_change(switch_pair):
    reference, finetuned = switch_pair
    config = RouterNormConfig(
        method="rtn", avg_bits=2.5, group_size=16, ranking="router", reference_model=str(reference)
    )
    allocation = allocate(finetuned, config, progress=False)
    assert len(allocation.bits) == 4  # two encoder and two decoder MoE layers
    for bits in allocation.bits.values():
        assert {e for e, b in enumerate(bits) if b == 3} == {1, 6, 3, 0}
    # without the reference the final norms (1.3, 1.8, 1.4, 1.55, 1.8, 1.2, 2.4, 1.8) rank: 5, 0, 2, 3
    final_only = allocate(finetuned, RouterNormConfig(method="rtn", avg_bits=2.5, ranking="router"), progress=False)
    assert {e for e, b in enumerate(final_only.bits["encoder.block.0.layer.1.mlp.experts"]) if b == 3} == {5, 0, 2, 3}
    # quantize-on-load uses the reference too, and saves the allocation with the model
    model = AutoModelForSeq2SeqLM.from_pretrained(finetuned, quantization_config=config)
    assert model.config.quantization_config.allocation == allocation.bits


def test_a_reference_identical_to_the_model_is_warned_about(switch_pair, caplog):
    reference, finetuned = switch_pair
    with caplog.at_level("WARNING"):
        allocate(
            finetuned, RouterNormConfig(method="rtn", avg_bits=2.5, reference_model=str(reference)), progress=False
        )
    assert "same routers" not in caplog.text
    with caplog.at_level("WARNING"):
        allocate(
            reference, RouterNormConfig(method="rtn", avg_bits=2.5, reference_model=str(reference)), progress=False
        )
    assert "reference_model has the same routers as the model in 4 of 4 layers" in caplog.text


def test_mismatched_or_routerless_reference_is_refused(switch_pair, tmp_path, tiny_mixtral_path):
    _, finetuned = switch_pair

    def reference(name, **changes):
        save_tiny_switch(tmp_path / name, **{"num_experts": 8, **changes})
        return RouterNormConfig(method="rtn", reference_model=str(tmp_path / name))

    with pytest.raises(
        ValueError, match=r"router for .*coder\.block\.0\.layer\.\d\.mlp\.experts is \[4, 32\], the model's \[8, 32\]"
    ):
        allocate(finetuned, reference("four-experts", num_experts=4), progress=False)
    with pytest.raises(ValueError, match=r"the reference model has no router for (en|de)coder\.block\.1\."):
        allocate(finetuned, reference("one-layer", num_layers=1, num_decoder_layers=1), progress=False)
    with pytest.raises(ValueError, match="is a 'mixtral' checkpoint, the model a 'switch_transformers' one"):
        allocate(finetuned, RouterNormConfig(method="rtn", reference_model=str(tiny_mixtral_path)), progress=False)


def test_checkpoint_without_safetensors_is_refused(tmp_path, tiny_mixtral_path):
    shutil.copy(tiny_mixtral_path / "config.json", tmp_path)
    with pytest.raises(FileNotFoundError, match="allocation reads safetensors checkpoints only"):
        allocate(tmp_path, CONFIG, progress=False)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "mixtral"
