"""The one replacement path: every quantizer (rtn, hqq, gptq, the dense-linear formats) builds its
modules through these functions, as transformers' ``integrations/`` files do for theirs.

``build_*`` makes a module; ``swap_module`` puts it in the model in place of the one it replaces,
which it keeps (on the meta device, so free) for ``model.dequantize()``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from .bnb_linear import BnbInt8Linear, BnbNF4Linear
from .experts import MixedBitExperts, MixedBitOneHotExperts
from .linear import PackedLinear

REPLACEMENTS = {"top_k": MixedBitExperts, "one_hot": MixedBitOneHotExperts}
DENSE_LINEARS = {"moeq": PackedLinear, "bnb_nf4": BnbNF4Linear, "bnb_int8": BnbInt8Linear}
QUANTIZED_DENSE = tuple(DENSE_LINEARS.values())
QUANTIZED_MODULES = (MixedBitExperts, *QUANTIZED_DENSE)

_ORIGINAL = "_moeq_original"


def build_experts_module(adapter, shape, expert_bits, config, *, name: str, placeholders: bool) -> MixedBitExperts:
    """The mixed-bit experts module for an experts module of ``shape`` (an ``ExpertsShape``)."""
    return REPLACEMENTS[adapter.replacement](
        expert_bits,
        hidden_dim=shape.hidden_dim,
        intermediate_dim=shape.intermediate_dim,
        group_size=config.group_size,
        hidden_act=shape.activation,
        method=config.method,
        with_full_precision_placeholders=placeholders,
        name=name,
        gated=adapter.gated,
        integer_zeros=config.integer_zeros,
    )


def build_dense_linear(linear: nn.Linear, config, *, name: str, placeholders: bool) -> nn.Module:
    """The ``attention_method`` module for ``linear``."""
    packed = {"integer_zeros": config.integer_zeros} if config.attention_method == "moeq" else {}
    return DENSE_LINEARS[config.attention_method](
        linear.in_features,
        linear.out_features,
        bits=config.attention_bits,
        group_size=config.group_size,
        bias=linear.bias is not None,
        method=config.method,
        with_full_precision_placeholders=placeholders,
        name=name,
        **packed,
    )


def swap_module(model: nn.Module, name: str, replacement: nn.Module) -> None:
    """Put ``replacement`` at ``name``, keeping the module it replaces for dequantize()."""
    original = model.get_submodule(name)
    replacement.train(original.training)
    replacement.__dict__[_ORIGINAL] = original.to("meta")
    model.set_submodule(name, replacement)
    # The parent's weight init would reach into the module it was built with (Switch indexes its
    # experts by name, its attention reads `weight`); its weights all come from the checkpoint.
    model.get_submodule(name.rpartition(".")[0])._is_hf_initialized = True


def original_module(replacement: nn.Module) -> nn.Module | None:
    """The module ``replacement`` stands in for (on the meta device), or None."""
    return replacement.__dict__.get(_ORIGINAL)


def replace_with_mixed_bit_experts(
    model: nn.Module, adapter, shapes: Mapping, allocation: Mapping[str, list[int]], config, *, placeholders: bool
) -> None:
    """Swap every experts module in ``shapes`` for its (empty, meta) mixed-bit form."""
    for name, shape in shapes.items():
        with torch.device("meta"):
            replacement = build_experts_module(
                adapter, shape, allocation[name], config, name=name, placeholders=placeholders
            )
        swap_module(model, name, replacement)


def replace_with_quantized_linears(
    model: nn.Module, config, converts: Callable[[str, nn.Module], bool], *, placeholders: bool
) -> None:
    """Swap every ``nn.Linear`` that ``converts(name, module)`` accepts for its ``attention_method``
    form (empty, on the meta device)."""
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or not converts(name, module):
            continue
        with torch.device("meta"):
            replacement = build_dense_linear(module, config, name=name, placeholders=placeholders)
        swap_module(model, name, replacement)
