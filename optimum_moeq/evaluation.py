"""lm-eval integration: the harness's own CLI with the quantizer registered, and a function for a
model already loaded (through lm-eval's HFLM and simple_evaluate). lm-eval is used as it is."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence

from .hub import EVAL_RESULTS_FILE


def run_lm_eval_cli(argv: Sequence[str]) -> int:
    """``moeq eval ARGS`` == ``lm_eval ARGS``, after ``import optimum_moeq`` registered the quantizer."""
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError:
        raise ImportError("evaluation needs lm-eval: pip install 'optimum-moeq[eval]'") from None
    saved = sys.argv
    sys.argv = ["lm_eval", *argv]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved
    return 0


def evaluate(
    model,
    tokenizer,
    tasks: Sequence[str | dict],
    *,
    include_path: str | None = None,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 1,
    save_to: str | os.PathLike | None = None,
) -> dict:
    """Evaluate an already loaded (quantized) model with lm-eval on ``tasks`` (names, or task configs
    as dicts such as ``tasks.bundled_task()``); optionally keep the results in
    ``save_to/eval_results.json``, where the model card picks them up."""
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ImportError("evaluation needs lm-eval: pip install 'optimum-moeq[eval]'") from None
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    results = simple_evaluate(
        model=lm,
        tasks=list(tasks),
        task_manager=TaskManager(include_path=include_path),
        limit=limit,
        num_fewshot=num_fewshot,
        log_samples=False,
    )
    if save_to is not None:
        with open(os.path.join(save_to, EVAL_RESULTS_FILE), "w", encoding="utf-8") as f:
            json.dump({"results": results["results"]}, f, indent=2, default=str)
    return results
