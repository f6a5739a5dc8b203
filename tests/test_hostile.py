"""Probes a hostile (or unlucky) user tried, kept so they stay fixed: converted, re-sharded and
tampered checkpoints, kills during overwrite, concurrent runs, symlinks, stray files, bad paths."""

import json
import shutil

import pytest
import torch
from conftest import quantize_argv
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from optimum_moeq import RouterNormConfig, verify_checkpoint


@pytest.fixture(scope="module")
def saved(tiny_mixtral_path, tmp_path_factory):
    """A quantized tiny Mixtral saved once; each test copies it before tampering."""
    model = AutoModelForCausalLM.from_pretrained(
        tiny_mixtral_path, quantization_config=RouterNormConfig(avg_bits=2.5, group_size=32, method="rtn")
    )
    folder = tmp_path_factory.mktemp("saved") / "q"
    model.save_pretrained(folder)
    return folder


@pytest.fixture
def copy(saved, tmp_path):
    target = tmp_path / "q"
    shutil.copytree(saved, target)
    return target


def _tensors_and_metadata(folder):
    with safe_open(folder / "model.safetensors", "pt") as f:
        metadata = f.metadata()
    return load_file(folder / "model.safetensors"), metadata


def _packed_names(tensors, suffix):
    return sorted(name for name in tensors if name.endswith(suffix))


# 1. converted checkpoints


def test_a_cast_of_every_tensor_to_bf16_is_refused_before_loading(copy):
    tensors, metadata = _tensors_and_metadata(copy)
    cast = {name: t.to(torch.bfloat16) for name, t in tensors.items()}  # the common conversion script
    save_file(cast, copy / "model.safetensors", metadata=metadata)
    with pytest.raises(ValueError, match=r"_q2 is stored as BF16 .* implies I32 .*converted"):
        AutoModelForCausalLM.from_pretrained(copy)


@pytest.mark.parametrize(("field", "dtype"), [("_q2", torch.float32), ("_scale", torch.int16), ("_q2", torch.uint32)])
def test_header_dtypes_edited_are_refused_whatever_the_writer(copy, field, dtype):
    tensors, metadata = _tensors_and_metadata(copy)
    name = _packed_names(tensors, field)[0]
    tensors[name] = tensors[name].to(dtype) if dtype != torch.uint32 else tensors[name].view(torch.uint32)
    save_file(tensors, copy / "model.safetensors", metadata=metadata)
    with pytest.raises(ValueError, match=rf"{name} is stored as .* but the allocation in config.json implies"):
        AutoModelForCausalLM.from_pretrained(copy)


# 2. the allocation record lost with the shard metadata


def _permute_allocation(folder):
    config = json.loads((folder / "config.json").read_text())
    bits = config["quantization_config"]["allocation"]["model.layers.0.mlp.experts"]
    bits.reverse()  # same counts per width (the shapes still fit), other experts at 3 bits
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("writer", ["save_file", "save_torch_state_dict"])
def test_a_resave_that_drops_the_metadata_is_refused_when_widths_are_mixed(copy, writer):
    tensors, _ = _tensors_and_metadata(copy)
    (copy / "model.safetensors").unlink()
    if writer == "save_file":
        save_file(tensors, copy / "model.safetensors", metadata={"format": "pt"})
    else:
        from huggingface_hub import save_torch_state_dict

        save_torch_state_dict(tensors, copy, max_shard_size="20KB")  # re-sharded, metadata dropped
        assert (copy / "model.safetensors.index.json").is_file()
    _permute_allocation(copy)
    with pytest.raises(
        ValueError, match=r"records no allocation .*cannot be checked: re-save it with save_pretrained"
    ):
        AutoModelForCausalLM.from_pretrained(copy)


def test_re_sharding_with_save_pretrained_keeps_the_record_and_loads(saved, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(saved)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    assert verify_checkpoint(tmp_path / "sharded") > 0
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "sharded")
    ids = torch.arange(10)[None]
    torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_a_permuted_allocation_with_the_record_intact_is_refused(copy):
    _permute_allocation(copy)
    with pytest.raises(ValueError, match="does not match the one the packed weights were saved with"):
        AutoModelForCausalLM.from_pretrained(copy)


# 12. content integrity


def test_verify_names_a_flipped_code_byte(copy):
    assert verify_checkpoint(copy) > 0
    tensors, metadata = _tensors_and_metadata(copy)
    name = _packed_names(tensors, "down_proj_b3_q1")[0]
    tensors[name].view(-1)[0] ^= 1
    save_file(tensors, copy / "model.safetensors", metadata=metadata)
    with pytest.raises(ValueError, match=rf"{name.replace('block_sparse_moe', 'mlp')} does not match the digest"):
        verify_checkpoint(copy)


def test_verify_names_two_same_shaped_tensors_swapped(copy):
    tensors, metadata = _tensors_and_metadata(copy)
    first, second = _packed_names(tensors, "gate_up_proj_b2_q2")[:2]
    tensors[first], tensors[second] = tensors[second], tensors[first]
    save_file(tensors, copy / "model.safetensors", metadata=metadata)
    with pytest.raises(ValueError, match="does not match the digest recorded"):
        verify_checkpoint(copy)


def test_verify_catches_an_allocation_edited_in_config_and_metadata_alike(copy):
    tensors, metadata = _tensors_and_metadata(copy)
    _permute_allocation(copy)
    allocation = json.loads((copy / "config.json").read_text())["quantization_config"]["allocation"]
    metadata["moeq_allocation"] = json.dumps(allocation, sort_keys=True)
    save_file(tensors, copy / "model.safetensors", metadata=metadata)
    AutoModelForCausalLM.from_pretrained(copy)  # consistent edits load (only the digests can tell) ...
    with pytest.raises(ValueError, match="model.layers.0.mlp.experts.* does not match the digest"):
        verify_checkpoint(copy)  # ... and verify tells


def test_shards_of_two_saves_with_the_same_allocation_are_refused(tiny_mixtral_path, saved, tmp_path):
    allocation = json.loads((saved / "config.json").read_text())["quantization_config"]["allocation"]
    config = RouterNormConfig(avg_bits=2.5, group_size=32, method="hqq", allocation=allocation)
    other = AutoModelForCausalLM.from_pretrained(tiny_mixtral_path, quantization_config=config)
    ours = AutoModelForCausalLM.from_pretrained(saved)
    ours.save_pretrained(tmp_path / "a", max_shard_size="20KB")
    other.save_pretrained(tmp_path / "b", max_shard_size="20KB")
    shard = sorted((tmp_path / "a").glob("*.safetensors"))[-1]
    shutil.copy(tmp_path / "b" / shard.name, shard)
    with pytest.raises(ValueError, match="shards come from different saves"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "a")


def test_a_nan_scale_is_refused_at_load_and_at_save(copy, saved):
    tensors, metadata = _tensors_and_metadata(copy)
    name = _packed_names(tensors, "gate_up_proj_b2_scale")[0]
    tensors[name].view(-1)[3] = float("nan")
    save_file(tensors, copy / "model.safetensors", metadata=metadata)
    with pytest.raises(ValueError, match=r"refusing to load: .*gate_up_proj_b2_scale holds NaN or infinite"):
        AutoModelForCausalLM.from_pretrained(copy)
    model = AutoModelForCausalLM.from_pretrained(saved)
    with torch.no_grad():
        model.model.layers[1].mlp.experts.down_proj_b3_scale.view(-1)[0] = float("inf")  # zeros: integers
    with pytest.raises(ValueError, match=r"cannot save: .*layers.1.mlp.experts.down_proj_b3_scale holds NaN"):
        model.save_pretrained(copy.parent / "never")
    assert not (copy.parent / "never" / "model.safetensors").exists()


# 3, 4, 10. replacing OUT: kills at controlled points, concurrent runs, stale partial folders

_DRIVER = """
import os, shutil, signal, sys, time
import optimum_moeq.output_folder as output_folder
# Ctrl-C as in a terminal, even when the test runner was started in the background (where the
# shell leaves SIGINT ignored, and Python then installs no KeyboardInterrupt handler)
signal.signal(signal.SIGINT, signal.default_int_handler)
point, marker = sys.argv[1], sys.argv[2]
if point == "before-commit":
    commit = output_folder.OutputFolder.commit
    def paused(self):
        open(marker, "w").close()
        time.sleep(120)
        return commit(self)
    output_folder.OutputFolder.commit = paused
else:  # while the replaced OUT is being deleted
    rmtree = shutil.rmtree
    def slow(path, *args, **kwargs):
        if ".old-" in str(path):
            os.makedirs(path, exist_ok=True)
            open(marker, "w").close()
            time.sleep(120)
        return rmtree(path, *args, **kwargs)
    shutil.rmtree = slow
from optimum_moeq.cli import main
sys.exit(main(sys.argv[3:]))
"""


def _method_in(folder):
    return json.loads((folder / "config.json").read_text())["quantization_config"]["method"]


def _start_paused_run(tmp_path, point, args):
    import subprocess
    import sys
    import time

    marker = tmp_path / f"paused-{point}"
    process = subprocess.Popen([sys.executable, "-c", _DRIVER, point, str(marker), *args], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert process.poll() is None, process.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "the run never reached the point"
        time.sleep(0.1)
    return process


def _hidden_leftovers(out):
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


@pytest.fixture
def first_out(tiny_mixtral_path, tmp_path):
    from optimum_moeq.cli import main

    out = tmp_path / "out"
    assert main(quantize_argv(tiny_mixtral_path, out, method="rtn")) == 0
    return out


@pytest.mark.parametrize("point", ["before-commit", "removing-old"])
@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGINT", "SIGKILL"])
def test_a_run_stopped_during_overwrite_leaves_out_whole(tiny_mixtral_path, first_out, tmp_path, point, signal_name,
                                                         caplog):  # fmt: skip
    import signal

    from optimum_moeq.cli import main

    args = quantize_argv(tiny_mixtral_path, first_out, "--overwrite", method="hqq")
    process = _start_paused_run(tmp_path, point, args)
    process.send_signal(getattr(signal, signal_name))
    assert process.wait(timeout=60) != 0
    # the old OUT (killed before the swap) or the new one (killed after it), whole either way
    assert _method_in(first_out) == ("rtn" if point == "before-commit" else "hqq")
    assert verify_checkpoint(first_out) > 0
    AutoModelForCausalLM.from_pretrained(first_out)
    leftovers = _hidden_leftovers(first_out)
    if signal_name == "SIGKILL":
        assert any(".moeq-lock" in name for name in leftovers)
    # the next run recognises what a killed run left, names it and removes it
    with caplog.at_level("WARNING", logger="optimum_moeq.output_folder"):
        assert main(quantize_argv(tiny_mixtral_path, first_out, "--overwrite", method="rtn")) == 0
    assert _hidden_leftovers(first_out) == []
    for name in leftovers:
        if ".moeq-lock" not in name:
            assert name in caplog.text and "left by a run that was killed" in caplog.text
    assert _method_in(first_out) == "rtn"


def test_a_second_run_to_the_same_out_is_refused_while_the_first_runs(tiny_mixtral_path, tmp_path):
    from optimum_moeq.commands import quantize_to_folder

    out = tmp_path / "shared-out"
    process = _start_paused_run(tmp_path, "before-commit", quantize_argv(tiny_mixtral_path, out, method="rtn"))
    try:
        with pytest.raises(FileExistsError, match=rf"another run \(pid {process.pid} .*\) is writing .*shared-out"):
            quantize_to_folder(str(tiny_mixtral_path), out, RouterNormConfig(group_size=32, method="rtn"))
    finally:
        process.kill()
        process.wait()


def test_out_created_by_someone_else_during_the_run_is_kept_and_the_result_too(tiny_mixtral_path, tmp_path,
                                                                               monkeypatch):  # fmt: skip
    from optimum_moeq import output_folder
    from optimum_moeq.commands import quantize_to_folder

    out = tmp_path / "out"
    commit = output_folder.OutputFolder.commit

    def someone_else_first(self):
        out.mkdir()
        (out / "theirs.txt").write_text("not yours")
        return commit(self)

    monkeypatch.setattr(output_folder.OutputFolder, "commit", someone_else_first)
    with pytest.raises(FileExistsError, match=r"created by another process .* this run's result is in .*out\.moeq-"):
        quantize_to_folder(str(tiny_mixtral_path), out, RouterNormConfig(group_size=32, method="rtn"))
    assert sorted(p.name for p in out.iterdir()) == ["theirs.txt"]
    (kept,) = tmp_path.glob("out.moeq-*")
    assert verify_checkpoint(kept) > 0
    assert _hidden_leftovers(out) == []


def test_out_inside_the_input_model_is_refused(tiny_mixtral_path):
    from optimum_moeq.commands import check_output_folder

    with pytest.raises(ValueError, match="is inside the input MODEL"):
        check_output_folder(tiny_mixtral_path / "quantized", overwrite=False, model_id=str(tiny_mixtral_path))


# 7. a tokenizer that does not load


def test_a_tokenizer_that_fails_to_load_stops_the_run_before_quantizing(tiny_mixtral_path, tmp_path):
    from optimum_moeq.commands import quantize_to_folder

    model = tmp_path / "model"
    shutil.copytree(tiny_mixtral_path, model)
    (model / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "NoSuchTokenizerFast"}))
    with pytest.raises(ValueError, match=r"the tokenizer in .* fails to load .*fix or remove its tokenizer files"):
        quantize_to_folder(str(model), tmp_path / "out", RouterNormConfig(group_size=32, method="rtn"))
    assert not (tmp_path / "out").exists() and _hidden_leftovers(tmp_path / "out") == []


# 11. smaller ones


def test_a_binary_dataset_file_is_refused_by_name_before_the_checkpoint_is_read(tiny_mixtral_path, tmp_path,
                                                                                monkeypatch):  # fmt: skip
    import optimum_moeq.quantizer as quantizer

    binary = tmp_path / "calibration.bin"
    binary.write_bytes(bytes(range(256)) * 64)
    monkeypatch.setattr(quantizer, "allocate_from_files", lambda *a, **k: pytest.fail("the checkpoint was read"))
    config = RouterNormConfig(method="gptq", group_size=32, dataset=str(binary))
    with pytest.raises(
        ValueError, match=r"dataset='.*calibration.bin' is not UTF-8 text \(not decodable near byte 128"
    ):
        AutoModelForCausalLM.from_pretrained(tiny_mixtral_path, quantization_config=config)


def test_a_bad_plot_extension_fails_before_the_json_is_written(tiny_mixtral_path, tmp_path, monkeypatch):
    import optimum_moeq.commands as commands
    from optimum_moeq.commands import allocate_command

    monkeypatch.setattr(commands, "allocate", lambda *a, **k: pytest.fail("the checkpoint was scanned"))
    with pytest.raises(ValueError, match=r"cannot draw .*a.jpgx: 'jpgx' is not a picture format; use one of .*'png'"):
        allocate_command(str(tiny_mixtral_path), RouterNormConfig(), tmp_path / "a.json", tmp_path / "a.jpgx")
    assert not (tmp_path / "a.json").exists()


def test_an_allocation_entry_that_is_a_mapping_is_named_as_such():
    with pytest.raises(ValueError, match=r"allocation\['m'\]=\{0: 2\} must be a non-empty list of bits"):
        RouterNormConfig(allocation={"m": {0: 2}})


def test_an_index_naming_a_shard_outside_the_folder_is_refused(tiny_mixtral_path, tmp_path):
    from optimum_moeq import allocate

    model = tmp_path / "model"
    shutil.copytree(tiny_mixtral_path, model)
    shutil.copy(model / "model.safetensors", tmp_path / "x.safetensors")
    (model / "model.safetensors").unlink()
    index = {"metadata": {}, "weight_map": {"model.embed_tokens.weight": "../x.safetensors"}}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"names shard '../x.safetensors', outside the model folder"):
        allocate(str(model), RouterNormConfig(), progress=False)


# 5. push uploads the model's files only, never through a link out of the folder


@pytest.fixture
def captured_pushes(monkeypatch):
    from types import SimpleNamespace

    from huggingface_hub import HfApi

    commits = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **k: SimpleNamespace(repo_id=repo_id))
    monkeypatch.setattr(HfApi, "create_commit", lambda self, repo_id, operations, **k: commits.append(
        {op.path_in_repo for op in operations}))  # fmt: skip
    return commits


def test_push_uploads_only_the_model_files_and_lists_them(copy, tmp_path, captured_pushes, capsys):
    from optimum_moeq.cli import main

    key = tmp_path / "id_rsa"
    key.write_text("PRIVATE KEY")
    (copy / "id_rsa").symlink_to(key)
    (copy / "secrets.txt").write_text("password")
    (copy / "credentials.json").write_text("{}")
    (copy / "offload").mkdir()
    (copy / "offload" / "layer.dat").write_bytes(b"\0" * 8)
    (copy / "notes").mkdir()
    (copy / "notes" / "eval.md").write_text("my notes")
    assert main(["push", str(copy), "me/q", "--dry-run"]) == 0
    assert captured_pushes == []  # nothing uploaded
    out = capsys.readouterr().out
    assert (
        "would upload to me/q: README.md (the model card), config.json, generation_config.json, model.safetensors\n"
        in out
    )
    assert "not uploaded (name them with --include to add them): credentials.json, id_rsa, notes/, offload/, " in out
    assert main(["push", str(copy), "me/q", "--include", "notes/*.md", "--include", "id_rsa"]) == 0
    (files,) = captured_pushes
    expected = {"README.md", "config.json", "generation_config.json", "model.safetensors", "notes/eval.md"}
    assert files == expected | {"allocation.png"}  # the picture the card embeds, drawn for it
    assert "id_rsa (a link out of the folder)" in capsys.readouterr().out


def test_push_refuses_weights_that_are_a_link_out_of_the_folder(copy, tmp_path, captured_pushes, capsys):
    from optimum_moeq.cli import main

    (copy / "model.safetensors").rename(tmp_path / "elsewhere.safetensors")
    (copy / "model.safetensors").symlink_to(tmp_path / "elsewhere.safetensors")
    assert main(["push", str(copy), "me/q"]) == 2
    assert "is a link to" in capsys.readouterr().err and captured_pushes == []


# 6. a reference model of another architecture


def test_a_reference_model_of_another_family_or_shape_is_refused(tiny_mixtral_path, tmp_path):
    from conftest import tiny_mixtral_config
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from optimum_moeq import allocate

    qwen_config = Qwen3MoeConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, moe_intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_experts=8, num_experts_per_tok=2,
    )  # fmt: skip
    qwen = Qwen3MoeForCausalLM(qwen_config)
    qwen.save_pretrained(tmp_path / "qwen")
    with pytest.raises(ValueError, match=r"reference_model .* is a 'qwen3_moe' checkpoint, the model a 'mixtral' one"):
        allocate(str(tiny_mixtral_path), RouterNormConfig(reference_model=str(tmp_path / "qwen")), progress=False)
    from transformers import MixtralForCausalLM

    MixtralForCausalLM(tiny_mixtral_config(hidden_size=32, intermediate_size=64)).save_pretrained(tmp_path / "narrow")
    with pytest.raises(ValueError, match=r"router for model.layers.0.mlp.experts is \[8, 32\], the model's \[8, 64\]"):
        allocate(str(tiny_mixtral_path), RouterNormConfig(reference_model=str(tmp_path / "narrow")), progress=False)


# 8, 9. the card never writes through a link; config.json holds no local folders


def test_card_replaces_a_symlinked_readme_instead_of_writing_through_it(copy, tmp_path):
    from optimum_moeq.cli import main

    blob = tmp_path / "blob"
    blob.write_text("cached blob")
    (copy / "README.md").symlink_to(blob)
    assert main(["card", str(copy)]) == 0
    assert blob.read_text() == "cached blob"
    assert not (copy / "README.md").is_symlink() and "optimum-moeq" in (copy / "README.md").read_text()


def test_config_json_keeps_no_local_folders(tiny_mixtral_path, tmp_path):
    data = tmp_path / "private" / "calibration.txt"
    data.parent.mkdir()
    data.write_text("some text to calibrate on " * 200)
    config = RouterNormConfig(group_size=32, method="gptq", dataset=str(data), tokenizer=_ByteTokenizer(),
                              nsamples=4, seqlen=32, reference_model=str(tiny_mixtral_path))  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(tiny_mixtral_path, quantization_config=config)
    model.save_pretrained(tmp_path / "q")
    text = (tmp_path / "q" / "config.json").read_text()
    assert str(tmp_path) not in text and str(tiny_mixtral_path) not in text
    saved = json.loads(text)["quantization_config"]
    assert saved["dataset"] == "calibration.txt" and saved["reference_model"] == tiny_mixtral_path.name


class _ByteTokenizer:
    def __call__(self, text, **kwargs):
        return {"input_ids": [b % 128 for b in text.encode()]}
