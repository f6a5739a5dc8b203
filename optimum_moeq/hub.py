"""Model cards and Hub uploads for quantized checkpoints (huggingface_hub's ModelCard and commits)."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from fnmatch import fnmatch
from pathlib import Path

from huggingface_hub import CommitOperationAdd, EvalResult, HfApi, ModelCard, ModelCardData

from .allocation import Allocation, format_table
from .plots import plot_allocation

EVAL_RESULTS_FILE = "eval_results.json"  # written by optimum_moeq.evaluation, read into the card
_TEMPLATE = "moeq.md"


def template_path() -> str:
    """model_cards/moeq.md, installed with the package as optimum_moeq.model_cards."""
    try:
        from importlib.resources import files

        candidate = files("optimum_moeq.model_cards") / _TEMPLATE
        if candidate.is_file():
            return str(candidate)
    except ModuleNotFoundError:
        pass
    return str(Path(__file__).resolve().parent.parent / "model_cards" / _TEMPLATE)


def _true_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def _eval_results(folder: Path) -> tuple[list[EvalResult], str]:
    path = folder / EVAL_RESULTS_FILE
    if not path.is_file():
        return [], ""
    results = json.loads(path.read_text()).get("results", {})
    entries, lines = [], ["## Evaluation (lm-eval)", "", "| task | metric | value |", "|---|---|---|"]
    for task, metrics in sorted(results.items()):
        for key, value in sorted(metrics.items()):
            metric, comma, filter_name = key.partition(",")
            # lm-eval names metrics "metric,filter"; other keys (alias, sample_len) are bookkeeping
            if not comma or not isinstance(value, (int, float)) or metric.endswith("_stderr"):
                continue
            entries.append(
                EvalResult(
                    task_type="text-generation",
                    dataset_type=task,
                    dataset_name=task,
                    metric_type=metric,
                    metric_value=float(value),
                )  # fmt: skip
            )
            lines.append(f"| {task} | {metric} | {value:.4f} |")
    return entries, "\n".join(lines)


_BNB_ATTENTION = {"bnb_nf4": "4-bit NF4 (bitsandbytes)", "bnb_int8": "8-bit LLM.int8 (bitsandbytes)"}


def render_model_card(
    folder: str | os.PathLike,
    repo_id: str | None = None,
    base_model: str | None = None,
    name: str | None = None,
    allocation: Allocation | None = None,
    tags: list[str] | None = None,
) -> ModelCard:
    """The card of a saved quantized checkpoint, from its config (allocation) and eval results.

    The card embeds ``allocation.png``: drawn from ``allocation`` when given (with its signals),
    else kept if the folder has one, else drawn from the bits in the config.
    """
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    quantization = config.get("quantization_config") or {}
    if quantization.get("quant_method") != "moeq":
        raise ValueError(f"{folder} is not an optimum-moeq checkpoint (its config has no moeq quantization_config).")
    picture = folder / "allocation.png"
    if allocation is not None or not picture.is_file():
        plot_allocation(allocation or Allocation(bits=quantization["allocation"]), picture)
    allocation = Allocation(bits=quantization["allocation"])
    base_model = base_model or quantization.get("base_model") or _local_free(config.get("_name_or_path"))
    eval_results, evaluation = _eval_results(folder)
    name = repo_id or name or folder.name
    seq2seq = bool(config.get("is_encoder_decoder"))
    card_data = ModelCardData(
        base_model=base_model,
        base_model_relation="quantized" if base_model else None,
        library_name="transformers",
        pipeline_tag="text2text-generation" if seq2seq else "text-generation",
        tags=["optimum-moeq", "mixture-of-experts", "quantized", f"{allocation.average_bits:g}-bit", *(tags or [])],
        model_name=name,
        eval_results=eval_results or None,
    )
    attention_bits = quantization.get("attention_bits")
    attention = _BNB_ATTENTION.get(quantization.get("attention_method"), "kept in the model's dtype")
    if attention_bits is not None:
        attention = f"{attention_bits}-bit, same quantizer"
    return ModelCard.from_template(
        card_data,
        template_path=template_path(),
        model_name=name,
        repo_id=repo_id or "path/to/" + name,
        model_class="AutoModelForSeq2SeqLM" if seq2seq else "AutoModelForCausalLM",
        base_model_line=f"[{base_model}](https://huggingface.co/{base_model})" if base_model else "A MoE model",
        average_bits=f"{allocation.average_bits:.3f}",
        bit_levels=tuple(quantization.get("bit_levels", ())),
        ranking=quantization.get("ranking"),
        zeta=quantization.get("zeta"),
        method=quantization.get("method"),
        group_size=quantization.get("group_size"),
        format_version=quantization.get("format_version", 1),
        zeros="a b-bit integer zero point" if quantization.get("integer_zeros") else "a float16 zero point",
        attention=attention,
        true_size=f"{_human_bytes(_true_bytes(folder))} of safetensors",
        allocation_table="```\n" + format_table(allocation.bits) + "\n```",
        evaluation=evaluation,
    )


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


def _local_free(name: str | None) -> str | None:
    """A Hub id, or None for a local path (a card cannot link to someone's disk)."""
    if not name or os.path.isabs(name) or os.path.exists(name) or name.count("/") != 1:
        return None
    return name


def write_model_card(folder: str | os.PathLike, **card_options) -> Path:
    """Render the card (``render_model_card``'s options) into ``folder/README.md``: a new file put in
    place atomically, so a README.md that is a link (a Hub cache snapshot's) is replaced, not written
    through."""
    card = render_model_card(folder, **card_options)
    path = Path(folder) / "README.md"
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=folder, prefix=".README.", delete=False) as f:
        f.write(str(card))
    os.replace(f.name, path)
    return path


# What a quantized model needs on the Hub; anything else in the folder is uploaded only when named.
MODEL_FILES = (
    "config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model", "*.tiktoken", "chat_template.jinja",
    "chat_template.json", "allocation.png", EVAL_RESULTS_FILE,
)  # fmt: skip
_REQUIRED = ("config.json", "*.safetensors", "model.safetensors.index.json")


def upload_plan(folder: str | os.PathLike, include: Sequence[str] = ()) -> tuple[list[Path], list[str]]:
    """(files to upload, relative names left out): the folder's model files and those matching an
    ``include`` pattern (fnmatch, on the path relative to the folder); never hidden files, never
    README.md (the card is rendered for the commit), never a link that leads out of the folder."""
    folder = Path(folder)
    root = folder.resolve()
    chosen, left_out = [], []
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder).as_posix()
        if any(part.startswith(".") for part in path.relative_to(folder).parts) or relative == "README.md":
            continue
        if path.is_dir() and not path.is_symlink():
            continue
        wanted = ("/" not in relative and any(fnmatch(relative, p) for p in MODEL_FILES)) or any(
            fnmatch(relative, p) for p in include
        )
        if not wanted:
            left_out.append(relative)
            continue
        if not path.resolve().is_relative_to(root):
            if any(fnmatch(relative, p) for p in _REQUIRED):
                raise ValueError(
                    f"{path} is a link to {path.resolve()}, outside the folder: links out of it are never uploaded; "
                    "copy the file in (cp -L) to upload it."
                )
            left_out.append(f"{relative} (a link out of the folder)")
            continue
        if path.is_file():
            chosen.append(path)
    collapsed = dict.fromkeys(name if "/" not in name else name.split("/", 1)[0] + "/" for name in left_out)
    return chosen, list(collapsed)  # a folder left out is named once


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str | None = None,
    commit_description: str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    base_model: str | None = None,
    allocation: Allocation | None = None,
    tags: list[str] | None = None,
    include: Sequence[str] = (),
):
    """Upload ``folder`` to ``repo_id`` in one commit: the files of ``upload_plan`` (the model's own,
    and those ``include`` names), with the card rendered for it as README.md."""
    folder = Path(folder)
    card = render_model_card(folder, repo_id=repo_id, base_model=base_model, allocation=allocation, tags=tags)
    files, _ = upload_plan(folder, include)
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id  # "name" becomes "user/name"
    if revision is not None and not revision.startswith("refs/pr"):
        api.create_branch(repo_id, branch=revision, exist_ok=True)  # as transformers' push does
    operations = [CommitOperationAdd(path_in_repo=path.relative_to(folder).as_posix(), path_or_fileobj=str(path))
                  for path in files]  # fmt: skip
    operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=str(card).encode()))
    return api.create_commit(
        repo_id,
        operations=operations,
        commit_message=commit_message or "Upload optimum-moeq quantized model",
        commit_description=commit_description,
        revision=revision,
        create_pr=create_pr,
    )


def push_to_hub(
    model,
    repo_id: str,
    *,
    max_shard_size: int | str | None = "50GB",
    tokenizer=None,
    base_model: str | None = None,
    **push_options,
):
    """``model.push_to_hub``: transformers' arguments (``commit_message``, ``commit_description``,
    ``private``, ``token``, ``revision``, ``create_pr``, ``tags``: ``push_folder``'s), plus
    ``tokenizer`` and ``base_model`` for the card. Saves to a temporary folder and pushes it with the
    optimum-moeq card."""
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        base_model = base_model or _local_free(getattr(model.config, "_name_or_path", None))
        allocation = getattr(getattr(model, "hf_quantizer", None), "allocation", None)
        return push_folder(tmp, repo_id, base_model=base_model, allocation=allocation, **push_options)
