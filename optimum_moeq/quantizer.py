"""The HfQuantizer: thin glue between transformers' loading hooks and the parts of this package.

Order of events in ``from_pretrained``: the model is built on the meta device; before weights
load, the allocation is computed from the checkpoint files (or read from a saved config) and
each experts module is swapped for a mixed-bit one; each layer's expert weights then stream
through :class:`QuantizeExperts`, one projection of one layer at a time.
"""

from __future__ import annotations

import functools
import logging
import re
from importlib.util import find_spec

import torch
from transformers.core_model_loading import ConversionOps, WeightConverter
from transformers.quantizers.auto import register_quantizer
from transformers.quantizers.base import HfQuantizer
from transformers.quantizers.quantizers_utils import get_module_from_name, should_convert_module
from transformers.utils import is_accelerate_available

from .allocate import allocate_from_files
from .allocation import Allocation
from .calibration_data import check_calibration_data, is_token_ids, window_length
from .calibration_stream import can_stream
from .config import QUANT_METHOD, RouterNormConfig
from .dequantize import dequantized_module
from .hub import push_to_hub
from .kernels.grouped import triton_available
from .models import get_adapter
from .nn import QUANTIZED_MODULES, MixedBitExperts, replace_with_mixed_bit_experts, replace_with_quantized_linears
from .offload import (
    check_offload_folder,
    may_offload_to_disk,
    modules_needing_offload_folder,
    offload_folder_of_current_load,
)
from .quant import check_group_size
from .quant.packing import check_packable
from .saved_checkpoint import check_all_loaded, check_checkpoint, checkpoint_metadata, stored_tensors

logger = logging.getLogger(__name__)


@register_quantizer(QUANT_METHOD)
class RouterNormHfQuantizer(HfQuantizer):
    """Quantizes each expert at the bit-width the router-norm method gives it.

    The bits live in ``quantization_config.allocation`` alone (saved in config.json);
    ``allocation`` adds the signals and orders the scan that chose them read."""

    requires_calibration = False
    quantization_config: RouterNormConfig
    _scan: Allocation | None = None
    _streamed: dict | None = None  # streaming GPTQ's packed tensors, by full parameter name, until they load

    @property
    def allocation(self) -> Allocation | None:
        bits = self.quantization_config.allocation
        if bits is None:
            return None
        scan = self._scan if self._scan is not None and self._scan.bits == bits else Allocation(bits)
        return Allocation(bits=bits, signals=scan.signals, orders=scan.orders)

    def validate_environment(self, device_map=None, **kwargs) -> None:
        config = self.quantization_config
        config.post_init()  # the config may have been edited since construction
        if config.attention_method.startswith("bnb") and find_spec("bitsandbytes") is None:
            raise ImportError(
                f"attention_method={config.attention_method!r} needs bitsandbytes: pip install bitsandbytes"
            )
        if device_map is not None and not is_accelerate_available():
            raise ImportError("Loading with a device_map needs accelerate: `pip install accelerate`.")
        # transformers calls this again with the device map "auto" resolved to, before weights load
        if isinstance(device_map, dict) and config.allocation:
            self._check_experts_on_disk(device_map, config.allocation)

    def _check_experts_on_disk(self, device_map: dict, experts_modules) -> None:
        """Quantize-on-load writes packed experts placed on disk to the offload folder: without one,
        transformers would fail only when it reaches the first of them."""
        if self.pre_quantized:  # packed weights are read from the checkpoint's own files
            return
        on_disk = modules_needing_offload_folder(device_map, experts_modules)
        if on_disk and offload_folder_of_current_load() is None:
            named = ", ".join(on_disk[:2]) + (f" and {len(on_disk) - 2} more" if len(on_disk) > 2 else "")
            raise ValueError(
                f"device_map puts experts modules on disk ({named}); quantize-on-load writes their packed "
                "weights to an offload folder: pass offload_folder=... to from_pretrained, or a larger max_memory."
            )

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, device_map=None, **kwargs) -> None:
        config = self.quantization_config
        adapter = get_adapter(model.config)
        self._check_before_reading(model, adapter, device_map)
        shapes = adapter.experts_shapes(model, config.modules_to_not_convert)
        if isinstance(device_map, dict):  # a map given as is: checked before the scan
            self._check_experts_on_disk(device_map, shapes)
        _check_packable(shapes, config)
        self._set_allocation(checkpoint_files, adapter, shapes)
        if self._calibrating and checkpoint_files and can_stream(model, adapter):
            self._stream_gptq(model, checkpoint_files, adapter, device_map)
        if not self._calibrating or self._streamed is not None:
            # else GPTQ needs the experts in full precision: it replaces them after loading
            replace_with_mixed_bit_experts(
                model, adapter, shapes, config.allocation, config, placeholders=not self.pre_quantized
            )
        if self._dense_linears_on_load or (self._streamed is not None and config.attention_bits is not None):
            replace_with_quantized_linears(
                model, config, self._dense_linear_filter(model, adapter), placeholders=not self.pre_quantized
            )
        if self.pre_quantized and checkpoint_files:
            expected = stored_tensors(model, QUANTIZED_MODULES)
            check_checkpoint(checkpoint_files, expected, config.allocation, adapter)

    def _check_before_reading(self, model, adapter, device_map) -> None:
        """What can fail before the allocation scan reads the checkpoint; the default method chosen."""
        config = self.quantization_config
        if config.method is None:  # the default: calibrated where the family allows it
            from .calibration import gptq_supported

            config.method = "gptq" if gptq_supported(adapter, model.config) else "rtn"
            logger.info("optimum-moeq: method=%r (the default for %s)", config.method, model.config.model_type)
            config.settle_zero_format()
        if may_offload_to_disk(device_map):
            offload_folder = offload_folder_of_current_load()
            if offload_folder is not None:
                check_offload_folder(offload_folder)
        if self._calibrating:
            from .calibration import check_gptq_supported

            check_gptq_supported(adapter, model.config)
            vocab_size = model.config.get_text_config().vocab_size
            check_calibration_data(config.dataset, vocab_size, window_length(config.seqlen, model.config))

    def _set_allocation(self, checkpoint_files, adapter, shapes) -> None:
        """A saved (or the user's own) allocation is used as given; otherwise the scan computes it."""
        config = self.quantization_config
        if config.allocation is None:
            if self.pre_quantized:
                raise ValueError("the checkpoint's quantization_config has no allocation: it cannot be reloaded.")
            if not checkpoint_files:
                raise ValueError("quantize-on-load needs the checkpoint files to compute the allocation.")
            self._scan = allocate_from_files(checkpoint_files, adapter, config, experts_modules=set(shapes))
            config.allocation = {name: list(bits) for name, bits in self._scan.bits.items()}  # GPTQ may re-measure
            logger.info("optimum-moeq allocation:\n%s", self._scan)
        _check_allocation_matches_model(config.allocation, shapes)

    def _stream_gptq(self, model, checkpoint_files, adapter, device_map) -> None:
        """GPTQ walked over the checkpoint one layer at a time before loading; the packed tensors
        then replace the full-precision weights as they load."""
        from .calibration_stream import stream_gptq

        converts = self._dense_linear_filter(model, adapter)
        self._streamed, self.gptq_report = stream_gptq(
            model, checkpoint_files, adapter, self.quantization_config, self._tokenizer(model), converts, device_map
        )

    def _tokenizer(self, model):
        config = self.quantization_config
        if config.tokenizer is not None or is_token_ids(config.dataset):
            return config.tokenizer
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(model.config.name_or_path)
        except (OSError, ValueError) as err:
            raise ValueError(
                f"method='gptq' (the default) calibrates on text, which needs the model's tokenizer, and "
                f"{model.config.name_or_path!r} has none that loads ({type(err).__name__}): pass tokenizer=..., "
                "token ids as dataset=..., or method='rtn' for calibration-free quantization."
            ) from None

    def _dense_linear_filter(self, model, adapter):
        """``attention_bits`` / ``attention_method`` convert every nn.Linear outside the experts,
        routers, output embeddings and the family's ``dense_linears_kept``."""
        keep = self.get_modules_to_not_convert(
            model, self.quantization_config.modules_to_not_convert, add_default_skips=True
        )

        def converts(name: str, module) -> bool:
            return (
                should_convert_module(name, keep)
                and not adapter.is_routing(name)
                and name.rpartition(".")[2] not in adapter.dense_linears_kept
                and not adapter.inside_experts(name)
            )

        return converts

    def update_weight_conversions(self, weight_conversions, model):
        adapter = get_adapter(model.config)
        if not self.pre_quantized and adapter.extra_weight_conversions is not None:
            weight_conversions = list(weight_conversions) + adapter.extra_weight_conversions()
        weight_conversions = super().update_weight_conversions(weight_conversions, model)
        if self._streamed:
            placeholders = _experts_placeholders(model)
            weight_conversions = [
                _unread(converter) if _feeds_only(converter, placeholders) else converter
                for converter in weight_conversions
            ]
        return weight_conversions

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        if self.pre_quantized:
            return False
        module, tensor_name = get_module_from_name(model, param_name)
        return isinstance(module, QUANTIZED_MODULES) and tensor_name in module.projection_shapes

    def param_element_size(self, model, param_name: str, param: torch.Tensor) -> float:
        # The packed tensors are parameters of their own and are counted as such; the
        # full-precision placeholder they replace occupies nothing once loaded.
        if self.param_needs_quantization(model, param_name):
            return 0.0
        return param.element_size()

    def get_quantize_ops(self) -> ConversionOps:
        return QuantizeExperts(self)

    @property
    def _dense_linears_on_load(self) -> bool:
        """Dense linears quantized as they load: bitsandbytes' formats, and ``attention_bits``
        unless GPTQ quantizes them after loading."""
        config = self.quantization_config
        return config.attention_method != "moeq" or (config.attention_bits is not None and not self._calibrating)

    @property
    def _calibrating(self) -> bool:
        return self.quantization_config.method == "gptq" and not self.pre_quantized

    def _process_model_after_weight_loading(self, model, **kwargs):
        if self.pre_quantized:
            # the family's kept dense linears too: a save by an older optimum-moeq packed them
            kept = get_adapter(model.config).dense_linears_kept
            check_all_loaded(model, QUANTIZED_MODULES, also=lambda name: name.rpartition(".")[2] in kept)
        if self._calibrating and self._streamed is None:
            self._quantize_with_gptq(model)
        for module in model.modules():
            if isinstance(module, QUANTIZED_MODULES):
                module.requires_grad_(False)
        # model.push_to_hub(repo_id) uploads the packed checkpoint with the optimum-moeq model card
        model.push_to_hub = functools.partial(push_to_hub, model)
        return model

    def _quantize_with_gptq(self, model) -> None:
        from .calibration import quantize_model_gptq

        converts = self._dense_linear_filter(model, get_adapter(model.config))
        self.gptq_report = quantize_model_gptq(
            model, self.quantization_config, tokenizer=self._tokenizer(model), quantize_linear=converts
        )

    def is_serializable(self) -> bool:
        return True

    def _dequantize(self, model, dtype=None):
        """model.dequantize(): every packed module back to the model's own, in ``dtype``."""
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype or torch.float32
        adapter = get_adapter(model.config)
        for name, module in list(model.named_modules()):
            if isinstance(module, QUANTIZED_MODULES):
                model.set_submodule(name, dequantized_module(module, dtype, adapter))
        return model

    def get_state_dict_and_metadata(self, model):
        # each shard records the allocation and the packed tensors' digests, checked on reload
        return None, checkpoint_metadata(model, QUANTIZED_MODULES, self.quantization_config.allocation)

    @property
    def is_trainable(self) -> bool:
        return False

    @property
    def is_compileable(self) -> bool:
        # The kernels reach torch.compile as one custom op per projection, so generate() with a
        # static cache may compile the forward (with CUDA graphs) as it does for bf16 models. The
        # torch reference (no Triton) loops over the experts present: a graph break per layer.
        return triton_available()


class QuantizeExperts(ConversionOps):
    """Turns one full-precision weight (an experts projection [E, N, K] or a linear's [N, K])
    into the packed tensors of the module that receives it."""

    def __init__(self, hf_quantizer: RouterNormHfQuantizer):
        self.hf_quantizer = hf_quantizer

    def convert(self, input_dict, model=None, full_layer_name=None, missing_keys=None, **kwargs):
        (value,) = input_dict.values()
        value = value[0] if isinstance(value, list) else value
        module, proj = get_module_from_name(model, full_layer_name)
        prefix = full_layer_name.rsplit(".", 1)[0]
        packed = self._streamed_tensors(module, proj, prefix)
        if packed is None:  # rtn / hqq, and bitsandbytes' dense linears, quantize as they load
            if value is None:
                raise RuntimeError(
                    f"{full_layer_name}: streaming GPTQ packed no tensors for it, and its weight was not read."
                )
            packed = module.quantize_projection(proj, value)
        module.drop_placeholder(proj)
        if missing_keys is not None:
            missing_keys.discard(full_layer_name)
        return {f"{prefix}.{name}": tensor for name, tensor in packed.items()}

    def _streamed_tensors(self, module, proj: str, prefix: str) -> dict | None:
        """The packed tensors streaming GPTQ made for this projection, if it made them."""
        streamed, layout = self.hf_quantizer._streamed, getattr(module, "layout", None)
        if streamed is None or layout is None:
            return None
        names = [n for n in module.stored_specs() if layout.field_of(n)[0] == proj]
        if f"{prefix}.{names[0]}" not in streamed:
            return None
        return {n: streamed.pop(f"{prefix}.{n}") for n in names}


class _AlreadyPacked(ConversionOps):
    """Stands in for a family's merge of experts weights (``operations``) that streaming GPTQ has
    already read and packed."""

    def __init__(self, operations: list[ConversionOps]):
        self.operations = operations

    def convert(self, input_dict, source_patterns=None, target_patterns=None, **kwargs):
        return dict.fromkeys(target_patterns)


class _UnreadWeights(WeightConverter):
    """A family's converter whose checkpoint tensors are never read: streaming GPTQ already read
    them and holds their packed form. Reading, stacking and concatenating a Mixtral-8x7B layer's
    gate and up experts again (three copies of 1.9 GB) set the whole load's peak memory. Saving
    reverses the family's own merge, as it would without streaming."""

    __slots__ = ()

    def materialize_tensors(self) -> dict:
        self.collected_tensors.clear()  # the lazy readers, dropped unread
        return {}

    def reverse_transform(self) -> WeightConverter:
        original = WeightConverter(
            list(self._original_source_patterns), list(self._original_target_patterns),
            self.operations[0].operations, force_cpu=self.force_cpu,
        )  # fmt: skip
        original.scope_prefix, original.base_model_prefix = self.scope_prefix, self.base_model_prefix
        return original.reverse_transform()


def _unread(converter: WeightConverter) -> WeightConverter:
    unread = _UnreadWeights(
        list(converter._original_source_patterns), list(converter._original_target_patterns),
        [_AlreadyPacked(converter.operations)], force_cpu=converter.force_cpu,
    )  # fmt: skip
    unread.scope_prefix, unread.base_model_prefix = converter.scope_prefix, converter.base_model_prefix
    return unread


def _experts_placeholders(model) -> list[str]:
    """Names of the full-precision placeholders of the mixed-bit experts modules."""
    return [
        f"{name}.{proj}"
        for name, module in model.named_modules()
        if isinstance(module, MixedBitExperts)
        for proj in module.projection_shapes
        if proj in module._parameters
    ]


def _feeds_only(converter, placeholders: list[str]) -> bool:
    """Whether every target of a family's converter is an experts placeholder (streamed)."""
    if not isinstance(converter, WeightConverter) or not placeholders:
        return False

    def pattern(target: str) -> re.Pattern:
        return re.compile(r"(^|\.)" + re.escape(target.lstrip(".")).replace(r"\*", r"[^.]+") + "$")

    targets = [pattern(t) for t in converter._original_target_patterns]
    return all(any(t.search(name) for name in placeholders) for t in targets)


def _check_packable(shapes: dict, config: RouterNormConfig) -> None:
    """Before any weight is read: every projection packs at the widths that will be packed (a given
    allocation's own, else any of the levels) and takes the group size."""
    widths = {b for bits in config.allocation.values() for b in bits} if config.allocation else config.bit_levels
    for name, shape in shapes.items():
        for k, projection in (
            (shape.hidden_dim, f"{name} (input projection)"),
            (shape.intermediate_dim, f"{name}.down_proj"),
        ):
            check_packable(k, widths, projection)
            check_group_size(config.group_size, k, projection)


def _check_allocation_matches_model(allocation: dict[str, list[int]], shapes: dict) -> None:
    """A saved (possibly edited) allocation must name exactly the model's experts modules."""
    unknown = sorted(set(allocation) - set(shapes))
    if unknown:
        raise ValueError(f"allocation names {unknown}, which are not experts modules of this model.")
    missing = sorted(set(shapes) - set(allocation))
    if missing:
        raise ValueError(f"allocation has no bits for the experts modules {missing}.")
    for name, shape in shapes.items():
        if len(allocation[name]) != shape.num_experts:
            raise ValueError(
                f"allocation[{name!r}] lists {len(allocation[name])} bit-widths but the module has "
                f"{shape.num_experts} experts."
            )
