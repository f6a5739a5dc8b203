"""What the ``moeq`` subcommands do, as functions (the CLI only parses arguments)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from .allocate import allocate, check_location
from .allocation import Allocation
from .config import RouterNormConfig
from .hub import push_folder, write_model_card


def auto_model_class(model_id: str):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    config = AutoConfig.from_pretrained(model_id)
    return AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM


def allocate_command(model_id: str, config: RouterNormConfig, json_path=None, plot_path=None) -> Allocation:
    for path in (json_path, plot_path):  # before the checkpoint is read
        if path and not Path(path).resolve().parent.is_dir():
            raise FileNotFoundError(f"cannot write {path}: folder {Path(path).resolve().parent} does not exist.")
    allocation = allocate(model_id, config)
    if json_path:
        Path(json_path).write_text(allocation.to_json())
    if plot_path:
        from .plots import plot_allocation

        plot_allocation(allocation, plot_path)
    return allocation


def quantize_to_folder(
    model_id: str, out: str | os.PathLike, config: RouterNormConfig, overwrite: bool = False
) -> Path:
    """Quantize ``model_id`` into ``out`` with its tokenizer and model card, atomically: everything is
    written to a hidden sibling folder that replaces ``out`` only once complete."""
    out = check_output_folder(out, overwrite, model_id)
    check_location(model_id)
    _refuse_quantized_input(model_id)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        partial.chmod(0o777 & ~_umask())  # mkdtemp makes it private; the result is an ordinary folder
        model = auto_model_class(model_id).from_pretrained(model_id, quantization_config=config, dtype="auto")
        model.save_pretrained(partial)
        _save_tokenizer(model_id, partial)
        base_model = None if os.path.isdir(model_id) else model_id
        write_model_card(partial, base_model=base_model, name=out.name, allocation=model.hf_quantizer.allocation)
        if out.exists():
            shutil.rmtree(out)
        os.replace(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return out


def check_output_folder(out: str | os.PathLike, overwrite: bool, model_id: str | None = None) -> Path:
    """``out`` as an absolute path, or an error, before any work: a folder --overwrite may replace must
    hold neither the current directory nor the input model, and nothing on its way may be a file."""
    out = Path(out).resolve()
    if model_id is not None and os.path.isdir(model_id) and Path(model_id).resolve().is_relative_to(out):
        raise ValueError(f"OUT={out} is the input MODEL={model_id} or holds it: choose another OUT.")
    if out.exists():
        if not out.is_dir():
            raise FileExistsError(f"{out} exists and is not a folder: choose another OUT.")
        if not overwrite:
            raise FileExistsError(f"{out} already exists: pass --overwrite to replace it.")
        if Path.cwd().resolve().is_relative_to(out):
            raise ValueError(f"OUT={out} is the current directory or holds it: --overwrite would delete it.")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise NotADirectoryError(f"{parent} is a file: OUT={out} cannot be created below it.")
            break
    return out


def _refuse_quantized_input(model_id: str) -> None:
    from transformers import AutoConfig

    existing = getattr(AutoConfig.from_pretrained(model_id), "quantization_config", None)
    if existing:
        method = existing.get("quant_method") if isinstance(existing, dict) else existing.quant_method
        raise ValueError(
            f"{model_id} is already quantized (quant_method={method!r}): quantize the original checkpoint instead."
        )


def _umask() -> int:
    try:  # read without changing it: os.umask would, for a moment, for every thread
        with open("/proc/self/status") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def _save_tokenizer(model_id: str, folder: Path) -> None:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_id)
    except (OSError, ValueError, TypeError):  # checkpoints without a tokenizer (tiny test models)
        return
    tokenizer.save_pretrained(folder)


def card_command(folder: str, base_model: str | None = None) -> Path:
    if not (Path(folder) / "config.json").is_file():
        raise FileNotFoundError(f"{folder} is not a saved model folder (no config.json).")
    return write_model_card(folder, base_model=base_model)


def push_command(folder: str, repo_id: str, private: bool = False, token: str | None = None):
    if not (Path(folder) / "config.json").is_file():
        raise FileNotFoundError(f"{folder} is not a saved model folder (no config.json).")
    return push_folder(folder, repo_id, private=private, token=token)
