"""The moeq command, model cards, Hub pushes (captured, no network) and allocation pictures."""

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import quantize_argv
from huggingface_hub import HfApi, ModelCard
from transformers import AutoModelForCausalLM

from optimum_moeq import RouterNormConfig
from optimum_moeq.cli import main

REPO = Path(__file__).resolve().parent.parent
TOKENS = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))


def _logits(model):
    with torch.no_grad():
        return model(TOKENS).logits


def _png_is_a_picture(path, min_width=300):
    import matplotlib.image

    image = matplotlib.image.imread(path)
    assert image.shape[1] >= min_width and image.shape[0] >= 150
    assert image[..., :3].std() > 0.05  # not blank


def test_allocate_prints_the_table_and_writes_json_and_plot(tiny_mixtral_path, tmp_path, capsys):
    code = main(["allocate", str(tiny_mixtral_path), "--avg-bits", "2.5", "--json", str(tmp_path / "a.json"),
                 "--plot", str(tmp_path / "a.png")])  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert "model.layers.1.mlp.experts" in out and "average bits per expert weight: 2.5000" in out
    saved = json.loads((tmp_path / "a.json").read_text())
    assert set(saved["bits"]) == {"model.layers.0.mlp.experts", "model.layers.1.mlp.experts"}
    assert len(saved["signals"]["model.layers.0.mlp.experts"]["maxvar"]) == 8
    _png_is_a_picture(tmp_path / "a.png")


def test_quantize_writes_a_complete_folder_atomically(tiny_mixtral_path, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["quantize", "--method", "rtn", str(tiny_mixtral_path), str(out), "--avg-bits", "2.5", "--group-size", "32"]
    assert main(args) == 0
    for name in ("config.json", "model.safetensors", "README.md", "allocation.png"):
        assert (out / name).is_file(), name
    reference = AutoModelForCausalLM.from_pretrained(
        tiny_mixtral_path, quantization_config=RouterNormConfig(method="rtn", avg_bits=2.5, group_size=32)
    )
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(out)), _logits(reference))
    # an existing OUT is refused, one line, nothing touched
    before = sorted(p.name for p in out.iterdir())
    assert main(args) == 2
    assert capsys.readouterr().err.strip().endswith("already exists: pass --overwrite to replace it.")
    assert sorted(p.name for p in out.iterdir()) == before
    # a failure after loading began leaves neither OUT nor a partial folder
    bad = quantize_argv(str(tiny_mixtral_path), str(tmp_path / "bad"), group_size=48)
    assert main(bad) == 2
    assert "group_size=48 does not divide" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_bad_input_is_one_line_without_traceback(tmp_path):
    for args, message in (
        (["allocate", str(tmp_path / "missing"), "--avg-bits", "2.5"], "moeq: error:"),
        (["allocate", str(tmp_path), "--avg-bits", "9"], "avg_bits=9.0 is outside the bit levels (2, 3)"),
    ):
        result = subprocess.run([sys.executable, "-m", "optimum_moeq.cli", *args], capture_output=True, text=True,
                                env={"HF_HUB_OFFLINE": "1", "PATH": ""})  # fmt: skip
        assert result.returncode == 2
        assert message in result.stderr and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


@pytest.fixture
def captured_commits(monkeypatch):
    commits = []

    def create_repo(self, repo_id, **kwargs):
        return SimpleNamespace(repo_id=repo_id if "/" in repo_id else f"me/{repo_id}")

    def create_branch(self, repo_id, branch, exist_ok=False, **kwargs):
        commits.append({"branch": branch, "repo_id": repo_id, "exist_ok": exist_ok})

    def create_commit(self, repo_id, operations, commit_message=None, **kwargs):
        files = {}
        for op in operations:
            source = op.path_or_fileobj
            files[op.path_in_repo] = Path(source).read_bytes() if isinstance(source, str) else source
        commits.append({"repo_id": repo_id, "message": commit_message, "files": files, **kwargs})
        return None

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_branch", create_branch)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    return commits


def test_push_to_hub_uploads_a_loadable_checkpoint_and_a_valid_card(tiny_mixtral_path, tmp_path, captured_commits):
    model = AutoModelForCausalLM.from_pretrained(
        tiny_mixtral_path, quantization_config=RouterNormConfig(method="rtn", avg_bits=2.5, group_size=32)
    )
    model.push_to_hub("me/tiny-moeq", base_model="mistralai/Mixtral-8x7B-v0.1")
    (commit,) = captured_commits
    assert commit["repo_id"] == "me/tiny-moeq"
    assert {"config.json", "model.safetensors", "README.md", "allocation.png"} <= set(commit["files"])
    uploaded = tmp_path / "uploaded"
    uploaded.mkdir()
    for name, content in commit["files"].items():
        (uploaded / name).write_bytes(content)
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(uploaded)), _logits(model))

    card = ModelCard((uploaded / "README.md").read_text())
    data = card.data.to_dict()
    assert data["base_model"] == "mistralai/Mixtral-8x7B-v0.1" and data["base_model_relation"] == "quantized"
    assert data["library_name"] == "transformers" and "optimum-moeq" in data["tags"] and "2.5-bit" in data["tags"]
    assert "pip install optimum-moeq" in card.text and "import optimum_moeq" in card.text
    assert "model.layers.1.mlp.experts" in card.text and "Chowdhury" in card.text
    _png_is_a_picture(uploaded / "allocation.png")


def test_push_to_hub_takes_transformers_arguments(tiny_mixtral_path, captured_commits):
    model = AutoModelForCausalLM.from_pretrained(
        tiny_mixtral_path, quantization_config=RouterNormConfig(method="rtn", avg_bits=2.5, group_size=32)
    )
    model.push_to_hub("tiny-moeq", commit_message="v2", commit_description="why", revision="dev", create_pr=True,
                      max_shard_size="100KB", tags=["mine"])  # fmt: skip
    branch, commit = captured_commits  # the branch is made first, in the repo create_repo named
    assert branch == {"branch": "dev", "repo_id": "me/tiny-moeq", "exist_ok": True}
    assert commit["repo_id"] == "me/tiny-moeq"
    assert (commit["message"], commit["commit_description"], commit["revision"], commit["create_pr"]) == (
        "v2", "why", "dev", True,
    )  # fmt: skip
    assert "model.safetensors.index.json" in commit["files"]  # sharded as asked
    assert "mine" in ModelCard(commit["files"]["README.md"].decode()).data.tags


def test_push_leaves_hidden_files_and_the_folders_readme_alone(tiny_mixtral_path, tmp_path, captured_commits):
    out = tmp_path / "out"
    assert main(quantize_argv(str(tiny_mixtral_path), str(out))) == 0
    (out / "README.md").write_text("my own notes")
    (out / ".env").write_text("HF_TOKEN=secret")
    (out / ".git").mkdir()
    (out / ".git" / "config").write_text("[core]")
    assert main(["push", str(out), "me/tiny-moeq"]) == 0
    (commit,) = captured_commits
    assert not any(name.startswith(".") or "/." in name for name in commit["files"])
    assert {"config.json", "model.safetensors", "allocation.png", "README.md"} <= set(commit["files"])
    assert "optimum-moeq" in ModelCard(commit["files"]["README.md"].decode()).data.tags
    assert (out / "README.md").read_text() == "my own notes"


def test_card_names_the_right_class_and_attention(tmp_path):
    from conftest import save_tiny_switch
    from transformers import AutoModelForSeq2SeqLM

    from optimum_moeq.hub import render_model_card

    save_tiny_switch(tmp_path / "switch")
    model = AutoModelForSeq2SeqLM.from_pretrained(
        tmp_path / "switch",
        quantization_config=RouterNormConfig(method="rtn", group_size=16, attention_method="bnb_int8"),
    )
    model.save_pretrained(tmp_path / "q")
    card = render_model_card(tmp_path / "q")
    assert "AutoModelForSeq2SeqLM.from_pretrained(" in card.text and "AutoModelForCausalLM" not in card.text
    assert card.data.pipeline_tag == "text2text-generation"
    assert "| attention and dense linears | 8-bit LLM.int8 (bitsandbytes) |" in card.text
    assert "| packed format | version 2: per group a float16 scale and a b-bit integer zero point |" in card.text


def test_card_carries_eval_results_as_model_index(tiny_mixtral_path, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(quantize_argv(str(tiny_mixtral_path), str(out))) == 0
    results = {"results": {"piqa": {"alias": "piqa", "acc,none": 0.61, "acc_stderr,none": 0.01, "sample_len": 1838}}}
    (out / "eval_results.json").write_text(json.dumps(results))
    assert main(["card", str(out), "--base-model", "mistralai/Mixtral-8x7B-v0.1"]) == 0
    data = ModelCard((out / "README.md").read_text()).data.to_dict()
    (index,) = data["model-index"]
    (result,) = index["results"]
    assert result["dataset"]["type"] == "piqa" and result["metrics"] == [{"type": "acc", "value": 0.61}]


def test_push_command_refuses_a_folder_that_is_not_a_model(tmp_path, capsys):
    assert main(["push", str(tmp_path), "me/x"]) == 2
    assert "is not a saved model folder" in capsys.readouterr().err


def test_quantized_folder_card_is_named_after_the_folder(tiny_mixtral_path, tmp_path):
    assert main(["quantize", "--method", "rtn", str(tiny_mixtral_path), str(tmp_path / "tiny-moeq"),
                 "--avg-bits", "2.5", "--group-size", "32"]) == 0  # fmt: skip
    card = ModelCard((tmp_path / "tiny-moeq" / "README.md").read_text())
    assert card.data.model_name == "tiny-moeq" and ".partial" not in card.text
    assert "KiB of safetensors" in card.text
