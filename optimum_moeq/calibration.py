"""GPTQ with calibration data, layer by layer, each expert with the Hessian of the tokens its
router sends it (``method="gptq"``).

The model is walked one decoder layer at a time: the calibration hidden states entering the layer
are cached, the layer runs once to record what reaches each experts module (hidden states and
routing), its replacement is built through the same path as every other method
(``nn.build_experts_module``) and quantized through its own ``quantize_projection`` with a GPTQ
quantize function (gate_up from each expert's routed tokens, then down from the activations of
its already-quantized gate_up), swapped in, and the layer runs again to give the next layer its
(quantized) inputs. Every expert is calibrated: with ``expert_hessian="routed"`` one routed fewer
than ``min_expert_tokens`` tokens takes the Hessian of every token reaching the layer (never rtn),
and the report lists them. The experts of a width are solved at once (batched Hessians and
Cholesky, ``quant.gptq``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from .allocation import LayerSignals, allocate_layers, assign_bits, max_neuron_variance, router_norm_change
from .allocation.measured import expert_gain, rank_by_gain
from .calibration_data import calibration_tokens, window_length
from .config import RouterNormConfig
from .kernels.reference import dequantize_packed
from .models import get_adapter
from .nn import MixedBitExperts, build_dense_linear, build_experts_module, swap_module
from .quant import GroupQuantized
from .quant.gptq import quantize_gptq

logger = logging.getLogger(__name__)


@dataclass
class GptqReport:
    """Per experts module: calibration tokens routed to each expert, tokens its Hessian was built
    from, and the experts routed too few tokens whose Hessian took every token instead."""

    tokens_per_expert: dict[str, list[int]] = field(default_factory=dict)
    hessian_tokens: dict[str, list[int]] = field(default_factory=dict)
    all_tokens_fallback: dict[str, list[int]] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"GPTQ over {len(self.tokens_per_expert)} experts modules."]
        for name, experts in self.all_tokens_fallback.items():
            if experts:
                lines.append(f"{name}: experts {experts} were routed too few tokens; their Hessians use every token")
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


def gptq_supported(adapter, model_config) -> bool:
    """GPTQ walks the adapter's decoder layers and the gated experts' fused gate_up: decoder-only
    gated MoEs."""
    return adapter.gated and bool(adapter.decoder_layers) and not model_config.is_encoder_decoder


def check_gptq_supported(adapter, model_config) -> None:
    if not gptq_supported(adapter, model_config):
        raise ValueError(
            f"method='gptq' supports decoder-only gated MoE models, not {model_config.model_type!r}; "
            "use method='rtn' or 'hqq'."
        )


class _Captured(Exception):
    pass


@torch.no_grad()
def quantize_model_gptq(
    model: nn.Module,
    config: RouterNormConfig,
    dataset=None,
    tokenizer=None,
    *,
    progress: bool = True,
    quantize_linear: Callable[[str, nn.Module], bool] | None = None,
) -> GptqReport:
    """Quantize a loaded full-precision decoder-only MoE model in place with GPTQ: its experts, and
    with ``attention_bits`` the decoder layers' ``nn.Linear`` modules that ``quantize_linear(name,
    module)`` accepts (from_pretrained passes the same choice as rtn's; by default every one but the
    routing linears), each layer's linears before its experts, so the experts calibrate on the
    outputs of quantized attention."""
    adapter = get_adapter(model.config)
    check_gptq_supported(adapter, model.config)
    if config.allocation is None:
        config.allocation = allocation_from_model(model, config).bits
    dataset = config.dataset if dataset is None else dataset
    tokens = calibration_tokens(dataset, tokenizer, config.nsamples, window_length(config.seqlen, model.config))
    layers = model.get_submodule(adapter.decoder_layers)
    cached = _first_layer_inputs(model, layers[0], tokens)
    report = GptqReport()
    chosen = quantize_linear or (lambda name, module: not adapter.is_routing(name))

    def dense(name: str, module: nn.Module) -> bool:
        return not adapter.inside_experts(name) and chosen(name, module)

    for index, layer in enumerate(tqdm(layers, desc="GPTQ layers", disable=not progress)):
        cached = quantize_layer(model, f"{adapter.decoder_layers}.{index}", layer, cached, config, report, dense)
    model.config.quantization_config = config
    logger.info("%s", report)
    return report


def quantize_layer(model, prefix: str, layer, cached, config: RouterNormConfig, report, quantize_linear) -> list:
    """GPTQ for one decoder layer at ``prefix`` (its dense linears with ``attention_bits``, then its
    experts), swapped in place; returns the next layer's inputs, through the quantized layer."""
    adapter = get_adapter(model.config)
    if config.attention_bits is not None:
        _quantize_dense_linears(model, prefix, layer, cached, config, quantize_linear)
    for name, module in list(layer.named_modules()):
        if adapter.experts_module_key.match(f"{prefix}.{name}"):
            _quantize_experts_module(model, f"{prefix}.{name}", module, layer, cached, config, report)
    return [((_layer_output(layer(*args, **kwargs)),) + tuple(args[1:]), kwargs) for args, kwargs in cached]


def _quantize_dense_linears(model, prefix: str, layer, cached, config: RouterNormConfig, quantize_linear) -> None:
    """GPTQ for the layer's dense linears that ``quantize_linear`` accepts, each from the Hessian of
    its inputs."""
    linears = {
        f"{prefix}.{name}": module
        for name, module in layer.named_modules()
        if type(module) is nn.Linear and quantize_linear(f"{prefix}.{name}", module)
    }
    hessians = _input_hessians(layer, linears, cached)
    for name, linear in linears.items():
        with torch.device("meta"):  # every tensor is replaced below
            replacement = build_dense_linear(linear, config, name=name, placeholders=False)

        def quantize(weight, bits, _, hessian=hessians[name]):
            return quantize_gptq(
                weight.float(),
                hessian,
                bits,
                config.group_size,
                damp_percent=config.damp_percent,
                act_order=config.desc_act,
                integer_zero=config.integer_zeros,
            )

        replacement.store(replacement.quantize_projection("weight", linear.weight.detach(), quantize))
        if linear.bias is not None:
            replacement.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        swap_module(model, name, replacement)


def _input_hessians(layer, linears: dict[str, nn.Module], cached) -> dict[str, torch.Tensor]:
    """H = 2 X^T X / n (float64) of the inputs each linear receives over the calibration set,
    accumulated as the layer runs (no activations kept)."""
    sums = {name: 0.0 for name in linears}
    counts = dict.fromkeys(linears, 0)

    def accumulate(name):
        def hook(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            sums[name] = sums[name] + 2.0 * x.T @ x
            counts[name] += x.shape[0]

        return hook

    hooks = [module.register_forward_pre_hook(accumulate(name)) for name, module in linears.items()]
    try:
        for args, kwargs in cached:
            layer(*args, **kwargs)
    finally:
        for hook in hooks:
            hook.remove()
    return {name: sums[name] / max(counts[name], 1) for name in linears}


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
    routed = [(top_k_index == e).any(dim=-1) for e in range(shape.num_experts)]
    weights = _token_weights(model, adapter, name, hidden, routed, config)
    if config.ranking == "measured":
        config.allocation[name] = _measured_bits(module, hidden, weights, config)
    with torch.device("meta"):  # every stored tensor is replaced by store()
        replacement = build_experts_module(
            adapter, shape, config.allocation[name], config, name=name, placeholders=False
        )
    replacement.store(
        replacement.quantize_projection(
            "gate_up_proj", module.gate_up_proj.detach(), _gptq_with(hidden, weights, config)
        )
    )
    # nothing reads the full-precision gate_up from here on (the down projection's inputs come from the
    # quantized one): freed before the down projection's Hessians (a Mixtral layer's is 1.75 GiB in bf16)
    module._parameters.pop("gate_up_proj", None)
    inner = _InnerActivations(replacement, hidden)  # as the quantized gate_up gives them
    replacement.store(
        replacement.quantize_projection("down_proj", module.down_proj.detach(), _gptq_with(inner, weights, config))
    )
    swap_module(model, name, replacement)  # frees the full-precision experts
    report.tokens_per_expert[name] = [int(r.sum()) for r in routed]
    report.hessian_tokens[name] = [int((w > 0).sum()) for w in weights]
    report.all_tokens_fallback[name] = [
        e
        for e, r in enumerate(routed)
        if config.expert_hessian == "routed" and int(r.sum()) < config.min_expert_tokens
    ]


def _measured_bits(module, hidden: torch.Tensor, weights: list[torch.Tensor], config: RouterNormConfig) -> list[int]:
    """``ranking="measured"``: the layer's bits ordered by each expert's measured gain, on the inputs
    its full-precision projections receive."""
    gains = []
    for e, token_weights in enumerate(weights):
        keep = token_weights > 0
        x, w = hidden[keep], token_weights[keep]
        gate_up, down = module.gate_up_proj[e].detach().float(), module.down_proj[e].detach().float()
        gate, up = (x @ gate_up.T).chunk(2, dim=-1)
        inner = module.act_fn(gate) * up
        gains.append(expert_gain([(gate_up, x), (down, inner)], w, config.bit_levels, config.group_size))
    return assign_bits(rank_by_gain(gains), config.avg_bits, config.bit_levels)


def _token_weights(model, adapter, name: str, hidden, routed, config: RouterNormConfig) -> list[torch.Tensor]:
    """Per expert, the weight of each calibration token [T] in its Hessian (``expert_hessian``):
    1 where routed to it ("routed"; every token when fewer than ``min_expert_tokens`` are), 1 for
    every token ("all"), or the router's softmax probability for the expert ("weighted")."""
    if config.expert_hessian == "weighted":
        router = model.get_submodule(f"{name.rpartition('.')[0]}.{adapter.router_module}").weight
        probs = torch.softmax(hidden @ router.detach().float().T, dim=-1)
        return list(probs.T)
    every = torch.ones(hidden.shape[0], dtype=hidden.dtype, device=hidden.device)
    if config.expert_hessian == "all":
        return [every] * len(routed)
    return [r.to(hidden.dtype) if int(r.sum()) >= config.min_expert_tokens else every for r in routed]


class _InnerActivations:
    """The down projection's inputs for expert e, act(gate) * up through its quantized gate_up,
    made a chunk of tokens at a time as its Hessian is built (at Mixtral size all of an expert's
    [T, 2I] gate_up outputs would be about 1 GB)."""

    def __init__(self, experts: MixedBitExperts, hidden: torch.Tensor):
        self.experts, self.hidden = experts, hidden

    def rows_of(self, expert: int) -> Callable[[torch.Tensor], torch.Tensor]:
        w = dequantize_packed(self.experts.expert_projection("gate_up_proj", expert)).to(self.hidden.dtype)

        def rows(tokens: torch.Tensor) -> torch.Tensor:
            gate, up = (self.hidden[tokens] @ w.T).chunk(2, dim=-1)
            return self.experts.act_fn(gate) * up

        return rows


# Tokens per step of a Hessian's accumulation: bounds its float64 rows to 2048 x K (235 MB at K=14336).
HESSIAN_CHUNK_TOKENS = 2048


def _weighted_hessian(rows: Callable[[torch.Tensor], torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """H = 2 sum_t w_t x_t x_t^T / sum_t w_t (float64) over the tokens of nonzero weight, x_t =
    ``rows(token indices)``, accumulated a chunk of tokens at a time (no copy of all of them)."""
    tokens = (weights > 0).nonzero().squeeze(1)
    w = weights[tokens].double()
    hessian = None
    for start in range(0, max(tokens.numel(), 1), HESSIAN_CHUNK_TOKENS):
        chunk = slice(start, start + HESSIAN_CHUNK_TOKENS)
        x = rows(tokens[chunk]).double() * w[chunk].sqrt()[:, None]
        hessian = x.T @ x if hessian is None else hessian.addmm_(x.T, x)
    return hessian.mul_(2.0 / w.sum().clamp(min=1e-12))


def _gptq_with(inputs, weights: list[torch.Tensor], config: RouterNormConfig):
    """A quantize function for ``quantize_projection``: GPTQ for the experts of a width it is given
    at once (batched as memory allows there), each with the Hessian of its inputs over the tokens
    it weighs: rows of ``inputs`` (a [T, K] tensor) or ``_InnerActivations`` made for it."""

    def rows_of(expert: int):
        return inputs.rows_of(expert) if isinstance(inputs, _InnerActivations) else inputs.__getitem__

    def quantize(expert_weights: torch.Tensor, bits: int, experts: tuple[int, ...]) -> GroupQuantized:
        hessians = [_weighted_hessian(rows_of(e), weights[e]) for e in experts]
        hessians = hessians[0][None] if len(hessians) == 1 else torch.stack(hessians)  # one expert: no copy
        # the weights as stored (bf16): GPTQ makes its own float64 copy, a float32 one would only add to the peak
        return quantize_gptq(expert_weights, hessians, bits, config.group_size,
                             damp_percent=config.damp_percent, act_order=config.desc_act,
                             overwrite_hessian=True, integer_zero=config.integer_zeros)  # fmt: skip

    return quantize
