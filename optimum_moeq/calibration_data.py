"""GPTQ calibration data: what ``dataset=`` may be, checked before any weight is read, and the
token windows drawn from it."""

from __future__ import annotations

import numbers
import os
from collections.abc import Sequence

import torch


def _is_token_id(value) -> bool:
    """An int, a numpy or torch integer, or a 0-d integer tensor (never a bool)."""
    if isinstance(value, bool):
        return False
    if isinstance(value, numbers.Integral):
        return True
    return getattr(value, "ndim", None) == 0 and _is_token_id(value.item())


def _is_id_sequence(value) -> bool:
    if hasattr(value, "ndim") and hasattr(value, "tolist"):  # tensor or array
        return value.ndim == 1 and len(value) > 0
    return isinstance(value, Sequence) and not isinstance(value, str) and len(value) > 0


def is_token_ids(dataset) -> bool:
    """Token ids: a tensor, a list of ids, or a list of id sequences (lists, 1-d tensors or arrays)."""
    if isinstance(dataset, torch.Tensor):
        return True
    if not isinstance(dataset, Sequence) or isinstance(dataset, str) or not dataset:
        return False
    return all(_is_token_id(t) for t in dataset) or all(_is_id_sequence(d) for d in dataset)


def _is_text_list(dataset) -> bool:
    return isinstance(dataset, Sequence) and bool(dataset) and all(isinstance(d, str) for d in dataset)


def check_dataset_type(dataset) -> None:
    """Calibration data of a usable kind (whether a file exists is checked when loading)."""
    if dataset is None or isinstance(dataset, (str, os.PathLike)) or is_token_ids(dataset) or _is_text_list(dataset):
        return
    shown = repr(dataset) if len(repr(dataset)) <= 60 else repr(dataset)[:57] + "..."
    raise ValueError(
        f"dataset={shown} is not calibration data: give a local text file, a non-empty list of strings, "
        "or token ids (a list of ints, a list of lists of ints, or a tensor)."
    )


def check_calibration_data(dataset, vocab_size: int, seqlen: int) -> None:
    """Before any weight is read: the file exists; token ids are enough and within the vocabulary."""
    if isinstance(dataset, (str, os.PathLike)):
        _check_text_file(dataset)
    elif is_token_ids(dataset):
        ids = _flat_token_ids(dataset)
        _check_length(ids, seqlen)
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= vocab_size:
            raise ValueError(
                f"calibration token ids span {low}..{high}; this model's vocabulary is 0..{vocab_size - 1}."
            )


def calibration_tokens(dataset, tokenizer, nsamples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """``nsamples`` windows of ``seqlen`` token ids [nsamples, seqlen] from a local text file, a list
    of strings, or token ids (a list, a list of lists or a tensor) drawn at random positions."""
    if isinstance(dataset, (str, os.PathLike)):
        _check_text_file(dataset)
        with open(dataset, encoding="utf-8") as f:
            ids = _tokenize(f.read(), tokenizer)
    elif is_token_ids(dataset):
        ids = _flat_token_ids(dataset)
    elif _is_text_list(dataset):
        ids = _tokenize("\n\n".join(dataset), tokenizer)
    else:
        raise ValueError("dataset must be a local text file, a list of strings, or token ids.")
    _check_length(ids, seqlen)
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen + 1, (nsamples,), generator=generator)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])


def _check_text_file(path) -> None:
    if not os.path.isfile(path):
        raise ValueError(f"dataset={path!r} is not a local text file; give a path, strings or token ids.")


def _check_length(ids: torch.Tensor, seqlen: int) -> None:
    if ids.numel() < seqlen:
        raise ValueError(f"the calibration data has {ids.numel()} tokens, fewer than seqlen={seqlen}.")


def _flat_token_ids(dataset) -> torch.Tensor:
    """One flat tensor from a tensor, a list of ids or a list of id sequences."""
    if isinstance(dataset, torch.Tensor):
        return dataset.reshape(-1)
    flat = dataset if all(_is_token_id(t) for t in dataset) else [t for sample in dataset for t in sample]
    return torch.tensor([int(t) for t in flat], device="cpu")  # cpu: from_pretrained runs this under meta


def _tokenize(text: str, tokenizer) -> torch.Tensor:
    if tokenizer is None:
        raise ValueError("text calibration data needs a tokenizer: pass tokenizer= (or token ids as dataset).")
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
