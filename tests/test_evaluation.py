"""lm-eval on a tiny quantized model, offline, through `moeq eval` and through the function; the
accuracy is checked against the same log-likelihoods computed with plain transformers."""

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast  # noqa: E402

from optimum_moeq import RouterNormConfig  # noqa: E402
from optimum_moeq.demo import word_tokenizer  # noqa: E402
from optimum_moeq.evaluation import evaluate  # noqa: E402
from optimum_moeq.tasks import bundled_task, bundled_task_docs, write_bundled_task  # noqa: E402

DOCS = bundled_task_docs()


def _word_tokenizer():
    return word_tokenizer(text for d in DOCS for text in [d["question"], *d["choices"]])


@pytest.fixture(scope="module")
def quantized_folder(tiny_mixtral_path, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-moeq")
    model = AutoModelForCausalLM.from_pretrained(
        tiny_mixtral_path,
        quantization_config=RouterNormConfig(method="rtn", avg_bits=2.5, group_size=32),
        dtype=torch.float32,
    )
    model.save_pretrained(folder)
    _word_tokenizer().save_pretrained(folder)
    return folder


@torch.no_grad()
def _independent_accuracy(model, tokenizer) -> float:
    """lm-eval's multiple choice by hand: sum log p(" " + choice | question), argmax vs answer."""
    correct = 0
    for doc in DOCS:
        context = tokenizer(doc["question"], add_special_tokens=False)["input_ids"]
        scores = []
        for choice in doc["choices"]:
            whole = tokenizer(doc["question"] + " " + choice, add_special_tokens=False)["input_ids"]
            continuation = whole[len(context) :]
            logits = model(torch.tensor([whole[:-1]])).logits[0].double()
            logprobs = torch.log_softmax(logits[len(context) - 1 :], dim=-1)
            scores.append(sum(logprobs[i, t].item() for i, t in enumerate(continuation)))
        correct += int(max(range(len(scores)), key=scores.__getitem__) == doc["answer"])
    return correct / len(DOCS)


def test_moeq_eval_and_the_function_agree_with_plain_transformers(quantized_folder, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(quantized_folder)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(quantized_folder)
    expected = _independent_accuracy(model, tokenizer)

    results = evaluate(model, tokenizer, [bundled_task()], save_to=tmp_path)
    assert results["results"]["moeq_tiny_mc"]["acc,none"] == pytest.approx(expected)
    assert json.loads((tmp_path / "eval_results.json").read_text())["results"]["moeq_tiny_mc"]["acc,none"] == (
        pytest.approx(expected)
    )

    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    (tmp_path / "tasks").mkdir()
    write_bundled_task(tmp_path / "tasks")
    command = [
        sys.executable, "-m", "optimum_moeq.cli", "eval", "--model", "hf",
        "--model_args", f"pretrained={quantized_folder},dtype=float32", "--tasks", "moeq_tiny_mc",
        "--include_path", str(tmp_path / "tasks"), "--device", "cpu", "--batch_size", "1",
        "--output_path", str(tmp_path / "lm"),
    ]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env=env)  # any directory will do
    assert run.returncode == 0, run.stderr[-3000:]
    assert "moeq_tiny_mc" in run.stdout  # lm-eval's own results table
    (result_file,) = glob.glob(str(tmp_path / "lm" / "**" / "results_*.json"), recursive=True)
    assert json.loads(Path(result_file).read_text())["results"]["moeq_tiny_mc"]["acc,none"] == pytest.approx(expected)
