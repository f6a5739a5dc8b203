"""The HfQuantizer: thin glue between transformers' loading hooks and the parts of this package.

Order of events in ``from_pretrained``: the model is built on the meta device; before weights
load, the allocation is computed from the checkpoint files (or read from a saved config) and
each experts module is swapped for a :class:`MixedBitExperts`; each layer's fused expert weights
then stream through :class:`QuantizeExperts`, one projection of one layer at a time.
"""

from __future__ import annotations

import logging

import torch
from transformers.core_model_loading import ConversionOps
from transformers.quantizers.auto import register_quantizer
from transformers.quantizers.base import HfQuantizer
from transformers.quantizers.quantizers_utils import get_module_from_name, should_convert_module
from transformers.utils import is_accelerate_available

from .allocation import Allocation, allocate_layers, read_layer_signals
from .config import QUANT_METHOD, RouterNormConfig
from .models import get_adapter
from .nn import MixedBitExperts
from .quant import check_group_size

logger = logging.getLogger(__name__)


@register_quantizer(QUANT_METHOD)
class RouterNormHfQuantizer(HfQuantizer):
    """Quantizes each expert at the bit-width the router-norm method gives it."""

    requires_calibration = False
    quantization_config: RouterNormConfig

    def validate_environment(self, device_map=None, **kwargs) -> None:
        self.quantization_config.post_init()  # the config may have been edited since construction
        if device_map is not None and not is_accelerate_available():
            raise ImportError("Loading with a device_map needs accelerate: `pip install accelerate`.")

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs) -> None:
        config = self.quantization_config
        adapter = get_adapter(model.config)
        experts = {
            name: module
            for name, module in model.named_modules()
            if adapter.experts_module_key.match(name) and should_convert_module(name, config.modules_to_not_convert)
        }
        for name, module in experts.items():  # before any weight is read
            check_group_size(config.group_size, module.gate_up_proj.shape[-1], f"{name}.gate_up_proj")
            check_group_size(config.group_size, module.down_proj.shape[-1], f"{name}.down_proj")
        if self.pre_quantized:
            if config.allocation is None:
                raise ValueError("the checkpoint's quantization_config has no allocation: it cannot be reloaded.")
            self.allocation = Allocation(bits=config.allocation)
        else:
            if not checkpoint_files:
                raise ValueError("quantize-on-load needs the checkpoint files to compute the allocation.")
            signals = read_layer_signals(checkpoint_files, adapter)
            signals = {name: s for name, s in signals.items() if name in experts}
            self.allocation = allocate_layers(signals, config.avg_bits, config.bit_levels, config.ranking, config.zeta)
            config.allocation = self.allocation.bits
            logger.info("optimum-moeq allocation:\n%s", self.allocation)
        _check_allocation_matches_model(config.allocation, experts)

        hidden_act = model.config.get_text_config().hidden_act
        for name, module in experts.items():
            _, intermediate_x2, hidden = module.gate_up_proj.shape
            with torch.device("meta"):
                replacement = MixedBitExperts(
                    config.allocation[name],
                    hidden_dim=hidden,
                    intermediate_dim=intermediate_x2 // 2,
                    group_size=config.group_size,
                    hidden_act=hidden_act,
                    method=config.method,
                    with_full_precision_placeholders=not self.pre_quantized,
                    name=name,
                )
            model.set_submodule(name, replacement)

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        if self.pre_quantized:
            return False
        module, tensor_name = get_module_from_name(model, param_name)
        return isinstance(module, MixedBitExperts) and tensor_name in module.projection_shapes

    def param_element_size(self, model, param_name: str, param: torch.Tensor) -> float:
        # The packed tensors are parameters of their own and are counted as such; the
        # full-precision placeholder they replace occupies nothing once loaded.
        if self.param_needs_quantization(model, param_name):
            return 0.0
        return param.element_size()

    def get_quantize_ops(self) -> ConversionOps:
        return QuantizeExperts(self)

    def _process_model_after_weight_loading(self, model, **kwargs):
        for module in model.modules():
            if isinstance(module, MixedBitExperts):
                module.requires_grad_(False)
        return model

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


class QuantizeExperts(ConversionOps):
    """Turns one layer's fused full-precision projection [E, N, K] into its packed tensors."""

    def __init__(self, hf_quantizer: RouterNormHfQuantizer):
        self.hf_quantizer = hf_quantizer

    def convert(self, input_dict, model=None, full_layer_name=None, missing_keys=None, **kwargs):
        (value,) = input_dict.values()
        value = value[0] if isinstance(value, list) else value
        module, proj = get_module_from_name(model, full_layer_name)
        packed = module.quantize_projection(proj, value)
        module.drop_placeholder(proj)
        if missing_keys is not None:
            missing_keys.discard(full_layer_name)
        prefix = full_layer_name.rsplit(".", 1)[0]
        return {f"{prefix}.{name}": tensor for name, tensor in packed.items()}


def _check_allocation_matches_model(allocation: dict[str, list[int]], experts: dict) -> None:
    """A saved (possibly edited) allocation must name exactly the model's experts modules."""
    unknown = sorted(set(allocation) - set(experts))
    if unknown:
        raise ValueError(f"allocation names {unknown}, which are not experts modules of this model.")
    missing = sorted(set(experts) - set(allocation))
    if missing:
        raise ValueError(f"allocation has no bits for the experts modules {missing}.")
    for name, module in experts.items():
        num_experts = module.gate_up_proj.shape[0]
        if len(allocation[name]) != num_experts:
            raise ValueError(
                f"allocation[{name!r}] lists {len(allocation[name])} bit-widths but the module has "
                f"{num_experts} experts."
            )
