"""GPTQ with calibration data, layer by layer, each expert with the Hessian of the tokens its
router sends it (``method="gptq"``).

The model is walked one decoder layer at a time: the calibration hidden states entering the layer
are cached, the layer runs once to record what reaches each experts module (hidden states and
routing), its replacement is built through the same path as every other method
(``nn.build_experts_module``) and quantized through its own ``quantize_projection`` with a GPTQ
quantize function (gate_up from each expert's routed tokens, then down from the activations of
its already-quantized gate_up), swapped in, and the layer runs again to give the next layer its
(quantized) inputs. Experts that receive fewer than ``min_expert_tokens`` tokens are quantized
calibration-free (rtn), and the report lists them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from .allocation import LayerSignals, allocate_layers, max_neuron_variance, router_norm_change
from .calibration_data import calibration_tokens
from .config import RouterNormConfig
from .kernels.reference import dequantize_packed
from .models import get_adapter
from .nn import MixedBitExperts, build_experts_module, swap_module
from .quant import GroupQuantized, quantize_weight
from .quant.gptq import input_hessian, quantize_gptq

logger = logging.getLogger(__name__)


@dataclass
class GptqReport:
    tokens_per_expert: dict[str, list[int]] = field(default_factory=dict)
    calibration_free: dict[str, list[int]] = field(default_factory=dict)  # too few tokens

    def __str__(self) -> str:
        lines = [f"GPTQ over {len(self.tokens_per_expert)} experts modules."]
        for name, experts in self.calibration_free.items():
            if experts:
                lines.append(f"{name}: experts {experts} got too few tokens, quantized calibration-free")
        return "\n".join(lines)


def allocation_from_model(model: nn.Module, config: RouterNormConfig):
    """The allocation from a loaded model's own router and gate weights (no reference model)."""
    adapter = get_adapter(model.config)
    signals = {}
    for name, module in model.named_modules():
        if adapter.experts_module_key.match(name):
            router = model.get_submodule(f"{name.rpartition('.')[0]}.{adapter.router_module}").weight
            gate_up = module.gate_up_proj
            gate = gate_up[:, : adapter.input_rows(gate_up.shape[1])]
            signals[name] = LayerSignals(
                router_norm_change(router.detach()).tolist(), [max_neuron_variance(g.detach()) for g in gate]
            )
    return allocate_layers(signals, config.avg_bits, config.bit_levels, config.ranking, config.zeta)


def check_gptq_supported(adapter, model_config) -> None:
    """GPTQ walks the adapter's decoder layers and the gated experts' fused gate_up: decoder-only
    gated MoEs."""
    if not adapter.gated or not adapter.decoder_layers or model_config.is_encoder_decoder:
        raise ValueError(
            f"method='gptq' supports decoder-only gated MoE models, not {model_config.model_type!r}; "
            "use method='rtn' or 'hqq'."
        )


class _Captured(Exception):
    pass


@torch.no_grad()
def quantize_model_gptq(
    model: nn.Module, config: RouterNormConfig, dataset=None, tokenizer=None, *, progress: bool = True
) -> GptqReport:
    """Quantize a loaded full-precision decoder-only MoE model in place with GPTQ."""
    adapter = get_adapter(model.config)
    check_gptq_supported(adapter, model.config)
    if config.allocation is None:
        config.allocation = allocation_from_model(model, config).bits
    dataset = config.dataset if dataset is None else dataset
    tokens = calibration_tokens(dataset, tokenizer, config.nsamples, config.seqlen)
    layers = model.get_submodule(adapter.decoder_layers)
    cached = _first_layer_inputs(model, layers[0], tokens)
    report = GptqReport()
    for index, layer in enumerate(tqdm(layers, desc="GPTQ layers", disable=not progress)):
        prefix = f"{adapter.decoder_layers}.{index}"
        for name, module in layer.named_modules():
            if adapter.experts_module_key.match(f"{prefix}.{name}"):
                _quantize_experts_module(model, f"{prefix}.{name}", module, layer, cached, config, report)
        cached = [((_layer_output(layer(*args, **kwargs)),) + tuple(args[1:]), kwargs) for args, kwargs in cached]
    model.config.quantization_config = config
    logger.info("%s", report)
    return report


def _first_layer_inputs(model: nn.Module, first_layer: nn.Module, tokens: torch.Tensor) -> list:
    """(args, kwargs) entering the first decoder layer, one per calibration sample."""
    cached = []

    def capture(module, args, kwargs):
        cached.append((args, kwargs))
        raise _Captured

    device = next(model.parameters()).device
    hook = first_layer.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        for sample in tokens:
            try:
                model(sample[None].to(device), use_cache=False)
            except _Captured:
                pass
    finally:
        hook.remove()
    return cached


def _layer_output(output):
    return output[0] if isinstance(output, tuple) else output


def _record_expert_inputs(layer, experts, cached):
    """(hidden states [T, H], top_k_index [T, k]) that reach ``experts`` over the calibration set."""
    seen = []

    def record(module, args, kwargs):
        hidden, index = (list(args) + [kwargs.get("top_k_index")])[:2]
        seen.append((hidden.detach().float(), index.detach()))

    hook = experts.register_forward_pre_hook(record, with_kwargs=True)
    try:
        for args, kwargs in cached:
            layer(*args, **kwargs)
    finally:
        hook.remove()
    return torch.cat([h for h, _ in seen]), torch.cat([i for _, i in seen])


def _quantize_experts_module(model, name: str, module, layer, cached, config: RouterNormConfig, report) -> None:
    """Replace the full-precision experts ``module`` at ``name`` by its GPTQ-quantized form."""
    hidden, top_k_index = _record_expert_inputs(layer, module, cached)
    adapter = get_adapter(model.config)
    shape = adapter.experts_shape(module, model.config)
    with torch.device("meta"):  # every stored tensor is replaced by store()
        replacement = build_experts_module(
            adapter, shape, config.allocation[name], config, name=name, placeholders=False
        )
    inputs = [hidden[(top_k_index == e).any(dim=-1)] for e in range(shape.num_experts)]
    calibrated = [x.shape[0] >= config.min_expert_tokens for x in inputs]
    gate_up = module.gate_up_proj.detach()
    replacement.store(replacement.quantize_projection("gate_up_proj", gate_up, _gptq_with(inputs, calibrated, config)))
    inner = [_inner_activations(replacement, e, x) for e, x in enumerate(inputs)]  # as the quantized gate_up gives
    replacement.store(
        replacement.quantize_projection("down_proj", module.down_proj.detach(), _gptq_with(inner, calibrated, config))
    )
    swap_module(model, name, replacement)  # frees the full-precision experts
    report.tokens_per_expert[name] = [x.shape[0] for x in inputs]
    report.calibration_free[name] = [e for e, ok in enumerate(calibrated) if not ok]


def _inner_activations(experts: MixedBitExperts, expert: int, x: torch.Tensor) -> torch.Tensor:
    w = dequantize_packed(experts.expert_projection("gate_up_proj", expert)).to(x.dtype)
    gate, up = (x @ w.T).chunk(2, dim=-1)
    return experts.act_fn(gate) * up


def _gptq_with(inputs: list[torch.Tensor], calibrated: list[bool], config: RouterNormConfig):
    """A quantize function for ``quantize_projection``: each expert by GPTQ with the Hessian of its
    ``inputs``, or calibration-free (rtn) where it is not ``calibrated``."""

    def quantize(weights: torch.Tensor, bits: int, experts: tuple[int, ...]) -> GroupQuantized:
        quantized = [
            quantize_gptq(
                w.float(), input_hessian(inputs[e]), bits, config.group_size, damp_percent=config.damp_percent
            )
            if calibrated[e]
            else quantize_weight(w.float(), bits, config.group_size, "rtn")
            for w, e in zip(weights, experts)
        ]
        return GroupQuantized(
            torch.stack([q.codes for q in quantized]),
            torch.stack([q.scale for q in quantized]),
            torch.stack([q.zero for q in quantized]),
            bits,
            config.group_size,
        )

    return quantize
