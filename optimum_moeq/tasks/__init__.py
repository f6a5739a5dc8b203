"""The bundled lm-eval task, ``moeq_tiny_mc``: twelve three-way multiple-choice questions shipped
as package data, so that ``moeq demo`` and the tests evaluate offline from any working directory.

lm-eval reads a task's local ``data_files`` relative to the working directory, so the task is
given to it as a config whose data path is absolute: ``bundled_task()`` for ``evaluate`` (lm-eval
takes task configs as dicts), ``write_bundled_task(folder)`` as a YAML for ``--include_path``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

BUNDLED_TASK_NAME = "moeq_tiny_mc"
BUNDLED_TASK_DATA = Path(__file__).resolve().parent / "tiny_mc.jsonl"


def bundled_task_docs() -> list[dict]:
    """The questions: {"question", "choices", "answer" (index into choices)}."""
    return [json.loads(line) for line in BUNDLED_TASK_DATA.read_text(encoding="utf-8").splitlines()]


def bundled_task() -> dict:
    """The lm-eval task config of ``moeq_tiny_mc``."""
    return {
        "task": BUNDLED_TASK_NAME,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(BUNDLED_TASK_DATA)}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{question}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{answer}}",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }


def write_bundled_task(folder: str | os.PathLike) -> str:
    """Write the task as ``folder/moeq_tiny_mc.yaml`` (for ``moeq eval ... --include_path folder``)."""
    import yaml  # lm-eval's own dependency

    path = os.path.join(folder, f"{BUNDLED_TASK_NAME}.yaml")
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(bundled_task(), f, sort_keys=False)
    return path
