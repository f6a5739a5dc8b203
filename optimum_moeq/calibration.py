"""GPTQ with calibration data, layer by layer, each expert with the Hessian of the tokens its
router sends it (``method="gptq"``).

The model is walked one decoder layer at a time: the calibration hidden states entering the layer
are cached, the layer runs once to record what reaches each experts module (hidden states and
routing), every expert is quantized with GPTQ (gate_up from its routed tokens, then down from
the activations of its already-quantized gate_up), the experts module is swapped for its
packed form, and the layer runs again to give the next layer its (quantized) inputs. Experts
that receive fewer than ``min_expert_tokens`` tokens are quantized calibration-free (rtn), and
the report lists them.
"""

from __future__ import annotations

import logging
import numbers
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from .allocation import LayerSignals, allocate_layers, max_neuron_variance, router_norm_change
from .config import RouterNormConfig
from .dequantize import remember_original
from .models import get_adapter
from .nn import REPLACEMENTS
from .quant import GroupQuantized, dequantize, pack_projection, quantize_weight
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


def is_token_ids(dataset) -> bool:
    """Token ids (a tensor, or a list whose items are not strings), as opposed to text."""
    return isinstance(dataset, torch.Tensor) or (
        isinstance(dataset, (list, tuple)) and bool(dataset) and not isinstance(dataset[0], str)
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
    elif isinstance(dataset, Sequence) and dataset:  # strings
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
    """One flat tensor from a tensor, a list of ids or a list of lists (or 1-d tensors) of ids."""
    if isinstance(dataset, torch.Tensor):
        return dataset.reshape(-1)
    scalars = all(isinstance(t, numbers.Integral) or getattr(t, "ndim", None) == 0 for t in dataset)
    flat = dataset if scalars else [t for sample in dataset for t in sample]
    return torch.tensor([int(t) for t in flat], device="cpu")  # cpu: from_pretrained runs this under meta


def _tokenize(text: str, tokenizer) -> torch.Tensor:
    if tokenizer is None:
        raise ValueError("text calibration data needs a tokenizer: pass tokenizer= (or token ids as dataset).")
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])


def allocation_from_model(model: nn.Module, config: RouterNormConfig):
    """The allocation from a loaded model's own router and gate weights (no reference model)."""
    adapter = get_adapter(model.config)
    signals = {}
    for name, module in model.named_modules():
        if adapter.experts_module_key.match(name):
            router = model.get_submodule(f"{name.rpartition('.')[0]}.{adapter.router_module}").weight
            gate_up = module.gate_up_proj
            gate = gate_up[:, : gate_up.shape[1] // 2] if adapter.gated else gate_up
            signals[name] = LayerSignals(
                router_norm_change(router.detach()).tolist(), [max_neuron_variance(g.detach()) for g in gate]
            )
    return allocate_layers(signals, config.avg_bits, config.bit_levels, config.ranking, config.zeta)


def check_gptq_supported(adapter, model_config) -> None:
    """GPTQ walks ``model.model.layers`` and the gated experts' fused gate_up: decoder-only gated MoEs."""
    if not adapter.gated or model_config.is_encoder_decoder:
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
    device = next(model.parameters()).device
    layers = model.model.layers

    cached = []  # (args, kwargs) entering the first decoder layer, one per sample

    def capture(module, args, kwargs):
        cached.append((args, kwargs))
        raise _Captured

    hook = layers[0].register_forward_pre_hook(capture, with_kwargs=True)
    try:
        for sample in tokens:
            try:
                model(sample[None].to(device), use_cache=False)
            except _Captured:
                pass
    finally:
        hook.remove()

    report = GptqReport()
    hidden_act = model.config.get_text_config().hidden_act
    layer_prefix = _module_name(model, layers)
    for index, layer in enumerate(tqdm(layers, desc="GPTQ layers", disable=not progress)):
        experts = {
            f"{layer_prefix}.{index}.{name}": module
            for name, module in layer.named_modules()
            if adapter.experts_module_key.match(f"{layer_prefix}.{index}.{name}")
        }
        for name, module in experts.items():
            routed = _record_expert_inputs(layer, module, cached)
            replacement = _quantize_experts(module, routed, config, name, report, adapter, hidden_act)
            replacement.train(module.training)  # built after from_pretrained's eval()
            remember_original(replacement, module)  # frees its full-precision weights
            model.set_submodule(name, replacement)
        cached = [((_layer_output(layer(*args, **kwargs)),) + tuple(args[1:]), kwargs) for args, kwargs in cached]
    model.config.quantization_config = config
    logger.info("%s", report)
    return report


def _module_name(model: nn.Module, target: nn.Module) -> str:
    return next(name for name, module in model.named_modules() if module is target)


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


def _quantize_experts(module, routed, config: RouterNormConfig, name: str, report: GptqReport, adapter, hidden_act):
    hidden, top_k_index = routed
    bits = config.allocation[name]
    num_experts, two_i, hidden_dim = module.gate_up_proj.shape
    replacement = REPLACEMENTS[adapter.replacement](
        bits, hidden_dim, two_i // 2, config.group_size, hidden_act, method=config.method, name=name
    )
    act_fn = replacement.act_fn
    counts, fallback = [], []
    per_bits = {b: {"gate_up_proj": [], "down_proj": []} for b in replacement.bit_widths}
    for expert in range(num_experts):
        x = hidden[(top_k_index == expert).any(dim=-1)]
        counts.append(x.shape[0])
        gate_up = module.gate_up_proj[expert].float()
        down = module.down_proj[expert].float()
        if x.shape[0] < config.min_expert_tokens:
            fallback.append(expert)
            q_gate_up = quantize_weight(gate_up, bits[expert], config.group_size, "rtn")
            q_down = quantize_weight(down, bits[expert], config.group_size, "rtn")
        else:
            damp = config.damp_percent
            q_gate_up = quantize_gptq(gate_up, input_hessian(x), bits[expert], config.group_size, damp_percent=damp)
            w = dequantize(q_gate_up.codes, q_gate_up.scale, q_gate_up.zero)
            gate, up = (x @ w.T).chunk(2, dim=-1)
            inner = act_fn(gate) * up  # the down projection sees the quantized gate_up's output
            q_down = quantize_gptq(down, input_hessian(inner), bits[expert], config.group_size, damp_percent=damp)
        per_bits[bits[expert]]["gate_up_proj"].append(q_gate_up)
        per_bits[bits[expert]]["down_proj"].append(q_down)
    for b, projections in per_bits.items():
        for proj, quantized in projections.items():
            stacked = _stack(quantized)
            for f, tensor in pack_projection(stacked).tensors().items():
                param = nn.Parameter(tensor.to(module.gate_up_proj.device), requires_grad=False)
                setattr(replacement, f"{proj}_b{b}_{f}", param)
    report.tokens_per_expert[name] = counts
    report.calibration_free[name] = fallback
    return replacement


def _stack(quantized: list[GroupQuantized]) -> GroupQuantized:
    return GroupQuantized(
        torch.stack([q.codes for q in quantized]),
        torch.stack([q.scale for q in quantized]),
        torch.stack([q.zero for q in quantized]),
        quantized[0].bits,
        quantized[0].group_size,
    )
