"""What the ``moeq`` subcommands do, as functions (the CLI only parses arguments)."""

from __future__ import annotations

import copy
import os
from pathlib import Path

from .allocate import allocate, check_location
from .allocation import Allocation
from .config import RouterNormConfig
from .hub import push_folder, write_model_card
from .output_folder import OutputFolder


def auto_model_class(model_id: str):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    config = AutoConfig.from_pretrained(model_id)
    return AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM


def allocate_command(model_id: str, config: RouterNormConfig, json_path=None, plot_path=None) -> Allocation:
    for path in (json_path, plot_path):  # before the checkpoint is read
        if path and not Path(path).resolve().parent.is_dir():
            raise FileNotFoundError(f"cannot write {path}: folder {Path(path).resolve().parent} does not exist.")
    if plot_path:
        from .plots import check_plot_path

        check_plot_path(plot_path)
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
    """Quantize ``model_id`` into ``out`` with its tokenizer and model card. OUT is replaced only once
    the new folder is complete, atomically, and is whole whenever the run is stopped (see
    ``output_folder``)."""
    out = check_output_folder(out, overwrite, model_id)
    check_location(model_id)
    _refuse_quantized_input(model_id)
    tokenizer = load_tokenizer(model_id)  # a broken one fails now, not after the quantization
    if tokenizer is not None and config.tokenizer is None:  # GPTQ calibrates with it: loaded once
        config = copy.copy(config)
        config.tokenizer = tokenizer
    folder = OutputFolder(out, overwrite)
    with folder as partial:
        model = auto_model_class(model_id).from_pretrained(model_id, quantization_config=config, dtype="auto")
        model.save_pretrained(partial)
        if tokenizer is not None:
            tokenizer.save_pretrained(partial)
        base_model = None if os.path.isdir(model_id) else model_id
        write_model_card(partial, base_model=base_model, name=out.name, allocation=model.hf_quantizer.allocation)
        folder.commit()
    return out


def check_output_folder(out: str | os.PathLike, overwrite: bool, model_id: str | None = None) -> Path:
    """``out`` as an absolute path, or an error, before any work: a folder --overwrite may replace must
    hold neither the current directory nor the input model, and nothing on its way may be a file."""
    out = Path(out).resolve()
    if model_id is not None and os.path.isdir(model_id):
        if Path(model_id).resolve().is_relative_to(out):
            raise ValueError(f"OUT={out} is the input MODEL={model_id} or holds it: choose another OUT.")
        if out.is_relative_to(Path(model_id).resolve()):
            raise ValueError(f"OUT={out} is inside the input MODEL={model_id}: choose an OUT outside it.")
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


_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model")


def load_tokenizer(model_id: str):
    """MODEL's tokenizer; None when it has none. A local folder with tokenizer files that fail to
    load is an error (a quantized model silently without its tokenizer is not usable as is)."""
    from transformers import AutoTokenizer

    has_files = os.path.isdir(model_id) and any((Path(model_id) / name).is_file() for name in _TOKENIZER_FILES)
    try:
        return AutoTokenizer.from_pretrained(model_id)
    except Exception as err:  # noqa: BLE001  (tokenizer code raises anything: OSError, ValueError, KeyError...)
        if has_files:
            reason = " ".join(str(err).split())[:200]
            raise ValueError(
                f"the tokenizer in {model_id} fails to load ({type(err).__name__}: {reason}): fix or "
                "remove its tokenizer files; the quantized model would otherwise be written without one."
            ) from err
        return None


def card_command(folder: str, base_model: str | None = None) -> Path:
    if not (Path(folder) / "config.json").is_file():
        raise FileNotFoundError(f"{folder} is not a saved model folder (no config.json).")
    return write_model_card(folder, base_model=base_model)


def verify_command(folder: str) -> str:
    from .saved_checkpoint import verify_checkpoint

    checked = verify_checkpoint(folder)
    if checked == 0:
        return f"{folder}: no digests recorded (saved by an older optimum-moeq): the allocation record checks out"
    return f"{folder}: all {checked} packed tensors match the digests recorded at save"


def push_command(
    folder: str, repo_id: str, private: bool = False, token: str | None = None, include=(), dry_run: bool = False
):
    """Print what will be uploaded (and what is left out), then push it, unless ``dry_run``."""
    from .hub import upload_plan

    if not (Path(folder) / "config.json").is_file():
        raise FileNotFoundError(f"{folder} is not a saved model folder (no config.json).")
    files, left_out = upload_plan(folder, include)
    print(f"{'would upload' if dry_run else 'uploading'} to {repo_id}: README.md (the model card), "
          + ", ".join(path.relative_to(folder).as_posix() for path in files))  # fmt: skip
    if left_out:
        print("not uploaded (name them with --include to add them): " + ", ".join(left_out))
    if dry_run:
        return None
    return push_folder(folder, repo_id, private=private, token=token, include=include)
