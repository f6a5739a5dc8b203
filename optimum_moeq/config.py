"""RouterNormConfig: what ``from_pretrained(..., quantization_config=...)`` takes."""

from __future__ import annotations

import copy
import difflib
import inspect
import logging
import math
import numbers
import os
from collections.abc import Mapping, Sequence
from typing import Any

from transformers.quantizers.auto import register_quantization_config
from transformers.utils.quantization_config import QuantizationConfigMixin

from .allocation.allocation import validate_bits_mapping
from .allocation.bits import check_avg_bits, check_levels
from .allocation.ranking import RANKINGS
from .calibration_data import check_dataset_type
from .quant import QUANTIZATION_METHODS
from .quant.hqq import check_hqq_zeros
from .quant.packed import FORMAT_VERSION, READABLE_FORMAT_VERSIONS
from .quant.packing import check_bits

QUANT_METHOD = "moeq"
ATTENTION_METHODS = ("moeq", "bnb_nf4", "bnb_int8")
EXPERT_HESSIANS = ("routed", "all", "weighted")

logger = logging.getLogger(__name__)


@register_quantization_config(QUANT_METHOD)
class RouterNormConfig(QuantizationConfigMixin):
    """Mixed-bit expert quantization chosen by router-norm change and MaxVar (Chowdhury et al., 2026).

    Args:
        avg_bits: average bits per expert weight in each MoE layer, between the lowest and
            highest of ``bit_levels``.
        bit_levels: 2 or 3 ascending bit-widths in 1..8 (3 levels equally spaced).
        group_size: weights per (scale, zero) group along each projection's input dimension.
        ranking: "combined" (router-norm order re-ranked by MaxVar), "router", "maxvar", or "measured"
            (with method="gptq": the high bits to the experts whose output error on the calibration
            data they lower the most; beyond the paper).
        zeta: MaxVar ratio above which the combined ranking moves an expert forward.
        method: per-expert weight quantizer. None (the default): "gptq" where the model's family
            supports it (decoder-only gated MoEs), else "rtn"; config.json then records the one used.
            "gptq" (calibrated on ``dataset``, streamed layer by layer; the best measured), "rtn"
            (round-to-nearest on the group range extended to 0: fast, no data) or "hqq" (scales and zeros
            optimised for weight error without data: lower weight MSE, but a trained model's
            perplexity measured worse than rtn, see benchmarks/results/replication.md).
        dataset: GPTQ calibration data: a local text file, a list of strings, token ids, or a name:
            "builtin" (the default: CPython's documentation topics, no download), "wikitext2" or
            "c4" (through the datasets library, online).
        tokenizer: tokenizer for text calibration data (default: the model's own).
        nsamples, seqlen: GPTQ draws ``nsamples`` windows of ``seqlen`` tokens from ``dataset``.
        damp_percent: GPTQ's Hessian damping, as a fraction of its mean diagonal.
        desc_act: GPTQ quantizes each weight's input columns in order of decreasing activation
            (Hessian diagonal), as transformers' GPTQConfig names it; groups keep their columns
            (static groups), so the checkpoint format does not change. On by default: it recovered a
            third more of rtn's perplexity cost on the testbed (benchmarks/results/testbed_default.md).
        expert_hessian: whose tokens build each expert's GPTQ Hessian: "weighted" (the default:
            every token reaching the layer, weighted by the router's softmax probability for the
            expert; the best measured, benchmarks/results/expert_hessians.md), "routed" (those its
            router sends it; an expert routed fewer than ``min_expert_tokens`` takes every token)
            or "all" (every token, as if routed to each expert).
        min_expert_tokens: with "routed", the fewest routed tokens an expert's own Hessian needs.
        modules_to_not_convert: module names (or name suffixes) to keep unquantized.
        attention_bits: None keeps attention and the other dense linears (shared experts, dense
            MLP layers) in the model's dtype; 4 or 8 (any of 1..8) quantizes them group-wise with
            ``method``. Routers and lm_head are never quantized.
        attention_method: "moeq" (the default: ``attention_bits`` as above), or "bnb_nf4" /
            "bnb_int8" to put those linears in bitsandbytes' 4-bit NF4 / 8-bit formats instead.
        reference_model: local folder or Hub id of the checkpoint before (fine-)tuning; the ranking
            then uses each router row's norm change from it (only its router tensors are read).
        allocation: bits per expert by experts module name; computed on load unless given (then used
            as it is, e.g. to compare allocations), and saved with the model.
        integer_zeros: store each group's zero point as a b-bit integer (format version 2, as GPTQ's
            format does: 2.14 bits per weight at 2 bits and group 128 instead of 2.25) rather than in
            float16. None (the default): True for "rtn" and "gptq", False for "hqq" (whose zero points
            are real numbers); config.json then records the choice.
        format_version: the packed format of a saved model (1: float16 zeros, 2: integer zeros);
            set from ``integer_zeros``, read from config.json on reload.
    """

    def __init__(
        self,
        avg_bits: float = 2.5,
        bit_levels: Sequence[int] = (2, 3),
        group_size: int = 128,
        ranking: str = "combined",
        zeta: float = 3.0,
        method: str | None = None,
        modules_to_not_convert: list[str] | None = None,
        reference_model: str | None = None,
        attention_bits: int | None = None,
        attention_method: str = "moeq",
        dataset: str | list | None = None,
        tokenizer: Any = None,
        nsamples: int = 128,
        seqlen: int = 512,
        damp_percent: float = 0.01,
        desc_act: bool = True,
        min_expert_tokens: int = 32,
        expert_hessian: str = "weighted",
        allocation: Mapping[str, Sequence[int]] | None = None,
        integer_zeros: bool | None = None,
        format_version: int | None = None,
        **kwargs: Any,
    ):
        _refuse_unknown_arguments(kwargs)
        self.quant_method = QUANT_METHOD
        self.avg_bits = _as_number(avg_bits)
        self.bit_levels = (
            [_as_int(b) for b in bit_levels] if isinstance(bit_levels, (list, tuple)) else _as_int(bit_levels)
        )
        self.group_size = _as_int(group_size)
        self.ranking = ranking
        self.zeta = _as_number(zeta)
        self.method = method
        self.modules_to_not_convert = modules_to_not_convert
        self.reference_model = None if reference_model is None else str(reference_model)
        self.attention_bits = _as_int(attention_bits)
        self.attention_method = attention_method
        self.dataset = dataset
        self.tokenizer = tokenizer
        self.nsamples, self.seqlen = _as_int(nsamples), _as_int(seqlen)
        self.damp_percent = _as_number(damp_percent)
        self.desc_act = desc_act
        self.min_expert_tokens = _as_int(min_expert_tokens)
        self.expert_hessian = expert_hessian
        self.allocation = (
            {k: [_as_int(b) for b in _as_list(v)] if _is_list_like(v) else v for k, v in allocation.items()}
            if isinstance(allocation, Mapping)
            else allocation
        )
        self.integer_zeros = integer_zeros
        self.format_version = format_version
        self.post_init()

    def post_init(self) -> None:
        """Refuse bad values now, before any weight is read."""
        if not isinstance(self.bit_levels, list):
            raise ValueError(f"bit_levels={self.bit_levels!r} must be a list or tuple of 2 or 3 bit-widths.")
        check_levels(self.bit_levels)
        if isinstance(self.avg_bits, bool) or not isinstance(self.avg_bits, (int, float)):
            raise ValueError(f"avg_bits={self.avg_bits!r} must be a number.")
        check_avg_bits(self.avg_bits, self.bit_levels)
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 1:
            raise ValueError(f"group_size={self.group_size!r} must be a positive integer, e.g. 64 or 128.")
        if self.ranking not in RANKINGS:
            raise ValueError(f"ranking={self.ranking!r} is not supported: allowed are {RANKINGS}.")
        if isinstance(self.zeta, bool) or not isinstance(self.zeta, (int, float)) or not 0 < self.zeta < math.inf:
            raise ValueError(f"zeta={self.zeta!r} must be a finite number greater than 0 (the paper uses 3.0).")
        if self.method is not None and self.method not in QUANTIZATION_METHODS:
            raise ValueError(f"method={self.method!r} is not supported: allowed are {QUANTIZATION_METHODS}.")
        if self.attention_bits is not None:
            try:
                check_bits(self.attention_bits)
            except ValueError as err:
                raise ValueError(f"attention_bits: {err} (None keeps the model's dtype)") from None
        if self.attention_method not in ATTENTION_METHODS:
            raise ValueError(
                f"attention_method={self.attention_method!r} is not supported: allowed are {ATTENTION_METHODS}."
            )
        if self.attention_method != "moeq" and self.attention_bits is not None:
            raise ValueError(
                f"attention_bits={self.attention_bits} and attention_method={self.attention_method!r} both quantize "
                "the dense linears: give one of them."
            )
        self._check_zero_format()
        for name in ("nsamples", "seqlen", "min_expert_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer.")
        if not (_is_real(self.damp_percent) and 0 <= self.damp_percent < 1):
            raise ValueError(f"damp_percent={self.damp_percent!r} must be a number in [0, 1), e.g. 0.01.")
        if not isinstance(self.desc_act, bool):
            raise ValueError(f"desc_act={self.desc_act!r} must be True or False.")
        if self.ranking == "measured" and self.method not in (None, "gptq") and self.allocation is None:
            raise ValueError(
                f"ranking='measured' measures each expert on calibration data: it needs method='gptq', got "
                f"method={self.method!r}."
            )
        if self.expert_hessian not in EXPERT_HESSIANS:
            raise ValueError(
                f"expert_hessian={self.expert_hessian!r} is not supported: allowed are {EXPERT_HESSIANS}."
            )
        check_dataset_type(self.dataset)
        if self.dataset is not None and self.method in ("rtn", "hqq"):
            logger.warning("dataset is calibration data for method='gptq'; method=%r does not use it.", self.method)
        if self.modules_to_not_convert is not None and (
            isinstance(self.modules_to_not_convert, str)
            or not isinstance(self.modules_to_not_convert, Sequence)
            or not all(isinstance(m, str) for m in self.modules_to_not_convert)
        ):
            raise ValueError(
                f"modules_to_not_convert={self.modules_to_not_convert!r} must be a list of module names, "
                'e.g. ["model.layers.0.mlp.experts"].'
            )
        if self.allocation is not None:
            validate_bits_mapping(self.allocation)

    def _check_zero_format(self) -> None:
        if self.format_version is not None and (
            isinstance(self.format_version, bool) or self.format_version not in READABLE_FORMAT_VERSIONS
        ):
            raise ValueError(
                f"format_version={self.format_version!r} is not readable by this optimum-moeq "
                f"(it reads versions {list(READABLE_FORMAT_VERSIONS)}); upgrade optimum-moeq."
            )
        if self.integer_zeros not in (None, True, False):
            raise ValueError(f"integer_zeros={self.integer_zeros!r} must be True, False or None (by method).")
        if self.integer_zeros is None and self.format_version == 1:  # a checkpoint saved before version 2
            self.integer_zeros = False
        if self.integer_zeros and self.format_version == 1:
            raise ValueError("integer_zeros=True needs format_version 2 (version 1 stores float16 zeros).")
        if self.integer_zeros and self.method == "hqq":
            check_hqq_zeros(True)
        if self.method is not None:
            self.settle_zero_format()

    def settle_zero_format(self) -> None:
        """Fix ``integer_zeros`` (by ``method`` where it was left to it) and the format version."""
        if self.integer_zeros is None:
            self.integer_zeros = self.method != "hqq"
        self.format_version = FORMAT_VERSION if self.integer_zeros else 1

    def to_dict(self) -> dict[str, Any]:
        """What config.json keeps: no tokenizer object, calibration data only as a name, and local
        paths (dataset, reference_model) without their folders: config.json goes to the Hub."""
        data = {k: v for k, v in self.__dict__.items() if k != "tokenizer"}
        if not isinstance(data.get("dataset"), str) or data.get("method") != "gptq":
            data["dataset"] = None
        for name in ("dataset", "reference_model"):
            if isinstance(data[name], str) and (os.path.isabs(data[name]) or os.path.exists(data[name])):
                data[name] = os.path.basename(os.path.normpath(data[name]))
        return copy.deepcopy(data)


def _refuse_unknown_arguments(kwargs: dict) -> None:
    method = kwargs.pop("quant_method", QUANT_METHOD)
    if str(method) != QUANT_METHOD:  # from_dict of another method's config
        raise ValueError(f"quant_method={method!r}: RouterNormConfig reads quant_method {QUANT_METHOD!r} only.")
    if kwargs:
        known = [name for name in inspect.signature(RouterNormConfig).parameters if name != "kwargs"]
        hints = [
            f"{name!r}"
            + (f" (did you mean {close[0]!r}?)" if (close := difflib.get_close_matches(name, known, 1)) else "")
            for name in kwargs
        ]
        raise TypeError(f"RouterNormConfig got unknown arguments {', '.join(hints)}; it takes {', '.join(known)}.")


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _as_number(value):
    """numpy and torch scalars as a Python number (Python numbers as given, for the messages)."""
    if hasattr(value, "ndim") and getattr(value, "ndim", 1) == 0 and hasattr(value, "item"):  # 0-d tensor
        value = value.item()
    if isinstance(value, (int, float)) or not _is_real(value):
        return value
    return int(value) if isinstance(value, numbers.Integral) else float(value)


def _as_int(value):
    """numpy and torch integers as int; anything else unchanged for the checks to name."""
    number = _as_number(value)
    return number if isinstance(number, int) and not isinstance(number, bool) else value


def _is_list_like(value) -> bool:
    """A list, tuple, array or tensor of bits (a mapping or string is left for the checks to name)."""
    return hasattr(value, "tolist") or (isinstance(value, Sequence) and not isinstance(value, str))


def _as_list(value):
    return value.tolist() if hasattr(value, "tolist") and not isinstance(value, (list, tuple)) else value
