"""GPTQ calibration data: what ``dataset=`` may be, checked before any weight is read, and the
token windows drawn from it.

Besides a local text file, strings or token ids, ``dataset`` takes a name:

- ``"builtin"`` (also what ``dataset=None`` means): CPython's own documentation topics
  (``pydoc_data.topics``, shipped with every CPython, about 465 KB of English technical prose and
  code examples, PSF licence), so that GPTQ needs no download and no data from the user;
- ``"wikitext2"`` / ``"c4"``, as transformers' GPTQ support names them: WikiText-2 (raw, train
  split) and the first shard of C4's English train split, loaded through the ``datasets``
  library when the machine is online.
"""

from __future__ import annotations

import codecs
import importlib.util
import numbers
import os
from collections.abc import Sequence

import torch

BUILTIN = "builtin"
NAMED_DATASETS = (BUILTIN, "wikitext2", "c4")
_C4_DOCUMENTS = 20_000  # of the first shard's 356k: enough text for 128 x 2048 tokens
_HUB_DATASETS = {
    "wikitext2": (("wikitext", "wikitext-2-raw-v1"), {"split": "train"}),
    "c4": (("allenai/c4",), {"data_files": {"train": "en/c4-train.00000-of-01024.json.gz"}, "split": "train"}),
}


def is_named_dataset(dataset) -> bool:
    """None, or one of ``NAMED_DATASETS`` that is not also a local file of that name."""
    return dataset is None or (isinstance(dataset, str) and dataset in NAMED_DATASETS and not os.path.isfile(dataset))


def named_dataset_text(name: str | None) -> str:
    """The text of a named calibration dataset (None: the built-in one)."""
    if name is None or name == BUILTIN:
        import pydoc_data.topics

        return "\n\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
    try:
        import datasets
    except ImportError:
        raise ImportError(f"dataset={name!r} is loaded with the datasets library: pip install datasets") from None
    args, kwargs = _HUB_DATASETS[name]
    try:
        data = datasets.load_dataset(*args, **kwargs)
    except Exception as err:  # offline, or the Hub refused: say what to do instead
        raise ConnectionError(
            f"dataset={name!r} could not be loaded from the Hugging Face Hub ({type(err).__name__}: {err}); "
            f"this machine may be offline: pass a local text file, strings or token ids, or dataset={BUILTIN!r} "
            "(no download)."
        ) from err
    texts = data["text"] if name == "wikitext2" else data.select(range(min(_C4_DOCUMENTS, len(data))))["text"]
    return "\n\n".join(texts)


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
    if isinstance(dataset, (str, os.PathLike)) or is_named_dataset(dataset) or is_token_ids(dataset):
        return
    if _is_text_list(dataset):
        return
    shown = repr(dataset) if len(repr(dataset)) <= 60 else repr(dataset)[:57] + "..."
    raise ValueError(
        f"dataset={shown} is not calibration data: give a local text file, a non-empty list of strings, "
        "or token ids (a list of ints, a list of lists of ints, or a tensor)."
    )


def check_calibration_data(dataset, vocab_size: int, seqlen: int) -> None:
    """Before any weight is read: a named dataset's loader is installed; the file exists; token ids
    are enough and within the vocabulary."""
    if is_named_dataset(dataset):
        if dataset in _HUB_DATASETS and importlib.util.find_spec("datasets") is None:
            raise ImportError(f"dataset={dataset!r} is loaded with the datasets library: pip install datasets")
    elif isinstance(dataset, (str, os.PathLike)):
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
    """``nsamples`` windows of ``seqlen`` token ids [nsamples, seqlen] from a named dataset, a local
    text file, a list of strings, or token ids (a list, a list of lists or a tensor) drawn at random
    positions."""
    if is_named_dataset(dataset):
        ids = _tokenize(named_dataset_text(dataset), tokenizer)
    elif isinstance(dataset, (str, os.PathLike)):
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


def window_length(seqlen: int, model_config) -> int:
    """Calibration windows no longer than the model's positions: ``seqlen`` (512 by default) would
    otherwise run a short-context model past what it was trained on."""
    limit = getattr(model_config.get_text_config(), "max_position_embeddings", None)
    return min(seqlen, limit) if isinstance(limit, int) and limit > 0 else seqlen


def _check_text_file(path) -> None:
    if not os.path.isfile(path):
        raise ValueError(
            f"dataset={path!r} is not a local text file; give a path, strings, token ids or one of {NAMED_DATASETS}."
        )
    decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0
    with open(path, "rb") as f:  # the whole file, in chunks: before the model loads, not after
        while chunk := f.read(1 << 20):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as err:
                where = offset + max(err.start, 0)
                raise ValueError(
                    f"dataset={os.fspath(path)!r} is not UTF-8 text (not decodable near byte {where}): give a text "
                    "file, or token ids."
                ) from None
            offset += len(chunk)


def _check_length(ids: torch.Tensor, seqlen: int) -> None:
    if ids.numel() < seqlen:
        raise ValueError(
            f"the calibration data has {ids.numel()} tokens, fewer than one window of {seqlen} (seqlen, at most the "
            "model's positions)."
        )


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
