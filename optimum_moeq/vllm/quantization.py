"""vLLM's side of an optimum-moeq checkpoint: quantization method ``"moeq"`` (imports vLLM).

``MoeqVllmConfig`` reads config.json's ``quantization_config`` (the allocation, the group size,
``attention_bits``) and gives each decoder layer's routed experts a ``MoeqFusedMoEMethod``. That
method registers the checkpoint's own packed tensors, ``{gate_up_proj,down_proj}_b{bits}_{q2,q1,
scale,zero}``, as the parameters of vLLM's experts layer, so they load as saved (no conversion, no
second copy), and computes the layer with this project's kernels: Triton on CUDA, the compiled CPU
kernels on CPU, the torch reference where neither runs. With ``attention_bits``, the dense linears
the checkpoint stores packed (``weight_{q2,q1,scale,zero}``) get ``MoeqLinearMethod``, the same for
one weight; vLLM's fused linears (qkv_proj, gate_up_proj) hold their parts side by side on the
output axis, which every packed field keeps last. Everything else (routers, embeddings, the
linears a checkpoint keeps in full precision) loads and runs as vLLM's own layers.
"""

from __future__ import annotations

import glob
import os
import re
import types
from typing import Any

import torch
from vllm.logger import init_logger
from vllm.model_executor.layers.fused_moe import FusedMoEMethodBase, RoutedExperts
from vllm.model_executor.layers.linear import LinearBase, LinearMethodBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig
from vllm.model_executor.utils import set_weight_attrs

from ..kernels import cpu_moe
from ..kernels.grouped import grouped_experts_forward, use_triton
from ..kernels.reference import experts_reference, packed_linear
from ..nn.bnb_linear import NF4_BLOCK, dequantize_int8, dequantize_nf4
from ..nn.linear import triton_linear_forward
from ..quant.layout import PackedLayout
from ..quant.packed import READABLE_FORMAT_VERSIONS
from ..quant.packing import unpack_zero_codes, zero_words
from ..saved_checkpoint import check_records, read_headers, stored_mismatch
from .sharding import check_tensor_parallel, shard_packed, shard_zero_codes

logger = init_logger("vllm.optimum_moeq")  # under "vllm", so vLLM's handler prints it
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
# a field every quantized dense linear of each attention_method stores, whatever its size
LINEAR_FIELD = {"moeq": ".weight_scale", "bnb_nf4": ".weight_absmax", "bnb_int8": ".weight_row_scale"}
# vLLM's fused linears and the checkpoint modules they hold, where a model class does not say
# (Qwen2-MoE adds its gate_up_proj to the instance's mapping only, after the quant config is set up)
FUSED_LINEARS = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}


@register_quantization_config("moeq")
class MoeqVllmConfig(QuantizationConfig):
    """config.json's moeq ``quantization_config`` as vLLM sees it."""

    def __init__(
        self,
        allocation: dict[str, list[int]],
        group_size: int,
        attention_bits: int | None = None,
        attention_method: str = "moeq",
        integer_zeros: bool = False,
    ):
        super().__init__()
        self.integer_zeros = integer_zeros
        self.allocation = {name: list(bits) for name, bits in allocation.items()}
        self.group_size = group_size
        self.attention_bits = attention_bits
        self.attention_method = attention_method
        # are the dense linears quantized at all (bitsandbytes' formats need no attention_bits)
        self.quantized_linears = attention_bits is not None or attention_method != "moeq"
        self.packed_linears: set[str] | None = None  # checkpoint module names, read by maybe_update_config
        # The allocation names transformers' modules ("model.layers.3.mlp.experts"); vLLM's prefixes
        # differ by family ("model.layers.3.block_sparse_moe.experts" for Mixtral), so each layer's
        # experts are found by their decoder-layer index.
        self.bits_by_layer: dict[int, list[int]] = {}
        for name, bits in self.allocation.items():
            match = _LAYER.search(name)
            if match is None or int(match.group(1)) in self.bits_by_layer:
                raise ValueError(
                    f"allocation entry {name!r} is not the experts of one decoder layer (model.layers.N....): "
                    "vLLM serves optimum-moeq checkpoints of decoder-only MoE models."
                )
            self.bits_by_layer[int(match.group(1))] = list(bits)

    def get_name(self) -> str:
        return "moeq"

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return 70  # Triton's tensor-core kernels (not consulted on CPU)

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # all of it is in config.json's quantization_config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> MoeqVllmConfig:
        version = config.get("format_version", 1)
        if version not in READABLE_FORMAT_VERSIONS:
            raise ValueError(
                f"moeq format_version {version} is not supported by this optimum-moeq "
                f"(supported: {list(READABLE_FORMAT_VERSIONS)}): upgrade optimum-moeq."
            )
        attention_method = config.get("attention_method") or "moeq"
        if attention_method not in LINEAR_FIELD:
            raise ValueError(
                f"attention_method {attention_method!r} is not one this optimum-moeq serves ({list(LINEAR_FIELD)}): "
                "upgrade optimum-moeq."
            )
        allocation = cls.get_from_keys(config, ["allocation"])
        if not allocation:
            raise ValueError("the checkpoint's quantization_config has no allocation: it cannot be served.")
        return cls(
            allocation, cls.get_from_keys(config, ["group_size"]), config.get("attention_bits"), attention_method,
            bool(config.get("integer_zeros")),  # absent before format 2: float16 zeros
        )  # fmt: skip

    def maybe_update_config(self, model_name: str, hf_config=None, revision=None) -> None:
        """A local checkpoint's shards must record this allocation (as transformers checks); their
        headers say which dense linears are packed."""
        files = sorted(glob.glob(os.path.join(model_name, "*.safetensors"))) if os.path.isdir(model_name) else []
        if files:
            check_records(files, self.allocation)
            self.packed_linears = {
                name.removesuffix(LINEAR_FIELD[self.attention_method])
                for header in read_headers(files).values()
                if header is not None
                for name in header.tensors
                if name.endswith(LINEAR_FIELD[self.attention_method])
            }

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        if isinstance(layer, RoutedExperts):
            match = _LAYER.search(prefix)
            bits = self.bits_by_layer.get(int(match.group(1))) if match else None
            return None if bits is None else MoeqFusedMoEMethod(self, layer.moe_config, bits)
        if isinstance(layer, LinearBase):
            return self._linear_method(prefix)
        return None  # embeddings, lm_head, attention: vLLM's defaults

    def _linear_method(self, prefix: str) -> LinearMethodBase:
        """Quantized if the checkpoint stores this linear (every part of a fused one) quantized."""
        if not self.quantized_linears:
            return UnquantizedLinearMethod()
        if self.packed_linears is None:
            raise ValueError(
                f"this checkpoint quantizes its dense linears (attention_bits={self.attention_bits}, attention_method="
                f"{self.attention_method!r}); which ones is read from its safetensors headers, so vLLM must be given "
                "the checkpoint's local folder."
            )
        parent, _, leaf = prefix.rpartition(".")
        parts = (self.packed_modules_mapping or {}).get(leaf) or FUSED_LINEARS.get(leaf) or [leaf]
        names = [f"{parent}.{part}" if parent else part for part in parts]
        packed = [name in self.packed_linears for name in names]
        if all(packed):
            if self.attention_method == "moeq":
                return MoeqLinearMethod(self, self.attention_bits, prefix)
            return MoeqBnbLinearMethod(self.attention_method, prefix)
        if any(packed):
            raise ValueError(
                f"{prefix}: vLLM fuses {names} into one linear, but the checkpoint stores only some of them quantized "
                f"({[n for n, p in zip(names, packed) if p]}): re-save them all with the same attention_bits / "
                "attention_method."
            )
        return UnquantizedLinearMethod()


class MoeqFusedMoEMethod(FusedMoEMethodBase):
    """One decoder layer's routed experts at their own bit-widths."""

    def __init__(self, quant_config: MoeqVllmConfig, moe, expert_bits: list[int]):
        super().__init__(moe)
        self.quant_config = quant_config
        self.expert_bits = expert_bits

    def create_weights(
        self, layer, num_experts, hidden_size, intermediate_size_per_partition, params_dtype, **extra_weight_attrs
    ):
        name = layer.layer_name
        if num_experts != len(self.expert_bits):
            raise ValueError(
                f"{name}: this rank holds {num_experts} experts but the allocation lists {len(self.expert_bits)}: "
                "expert parallelism and redundant experts are not supported for optimum-moeq checkpoints; "
                "use tensor parallelism."
            )
        parallel = self.moe.moe_parallel_config
        rank, tp_size = parallel.tp_rank, parallel.tp_size
        self.gated = self.moe.is_act_and_mul
        self.input_projection = "gate_up_proj" if self.gated else "up_proj"
        self.intermediate = intermediate_size_per_partition
        check_tensor_parallel(self.intermediate * tp_size, self.quant_config.group_size, tp_size, name)
        shapes = {
            self.input_projection: ((2 if self.gated else 1) * self.intermediate, hidden_size),
            "down_proj": (hidden_size, self.intermediate),
        }
        integer_zeros = self.quant_config.integer_zeros
        self.layout = PackedLayout(self.expert_bits, shapes, self.quant_config.group_size, name=name,
                                   integer_zeros=integer_zeros)  # fmt: skip
        self.names = list(self.layout.specs())
        for tensor_name, (shape, dtype) in self.layout.specs().items():
            param = torch.nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)
            layer.register_parameter(tensor_name, param)
            proj, bits, field = self.layout.field_of(tensor_name)
            full_shape = list(shape)
            n_full = shapes[proj][0] * (1 if proj == "down_proj" else tp_size)
            zero_codes = integer_zeros and field == "zero"
            if zero_codes and proj != "down_proj":  # packed along N: the whole projection's words
                full_shape[-1] = zero_words(bits, n_full)
            else:
                full_shape[-2 if proj == "down_proj" else -1] *= tp_size

            def weight_loader(param, loaded, *_, proj=proj, bits=bits, tensor_name=tensor_name, full_shape=full_shape,
                              n_full=n_full, zero_codes=zero_codes):  # fmt: skip
                if loaded.dtype != param.dtype or list(loaded.shape) != full_shape:
                    raise stored_mismatch(f"{name}.{tensor_name}", loaded.dtype, loaded.shape, param.dtype, full_shape)
                if zero_codes:
                    param.data.copy_(shard_zero_codes(loaded, bits, n_full, proj, rank, tp_size, self.gated))
                else:
                    param.data.copy_(shard_packed(loaded, proj, rank, tp_size, self.gated))
                param.moeq_loaded = True

            set_weight_attrs(param, {"weight_loader": weight_loader})
        # vLLM's experts layer loads only the names of its own expert mapping (experts.w13_weight,
        # experts.0.w1.weight, ...) and drops the rest without a word, so ours are routed here.
        own, vllm_load_weights = set(self.names), layer.load_weights

        def load_weights(experts_layer, weights):
            rest = []
            for tensor_name, tensor in weights:
                if tensor_name in own:
                    param = getattr(experts_layer, tensor_name)
                    param.weight_loader(param, tensor)
                    yield tensor_name
                else:
                    rest.append((tensor_name, tensor))
            if rest:
                yield from vllm_load_weights(rest)

        layer.load_weights = types.MethodType(load_weights, layer)

    def process_weights_after_loading(self, layer) -> None:
        # vLLM tracks unloaded parameters only for unquantized models: a missing packed tensor would
        # otherwise run on uninitialised memory.
        missing = [n for n in self.names if not getattr(getattr(layer, n), "moeq_loaded", False)]
        if missing:
            raise ValueError(
                f"{layer.layer_name}: the checkpoint has no {', '.join(missing)}: it does not belong to this "
                "config.json's allocation (re-save the model with optimum-moeq)."
            )

    def get_fused_moe_quant_config(self, layer):
        return None  # no modular kernel: apply() computes the whole layer

    def apply(self, layer, x, topk_weights, topk_ids, shared_experts=None, shared_experts_input=None):
        # With no modular kernel, vLLM's runner has routed (top-k, renormalized as the model asks)
        # and runs the shared experts itself; this returns the routed experts' sum.
        activation = getattr(layer.activation, "value", layer.activation)
        if layer.apply_router_weight_on_input:
            raise NotImplementedError(f"{layer.layer_name}: router weights on the input are not supported.")
        kwargs = dict(input_projection=self.input_projection, gated=self.gated)
        if use_triton("auto", self.layout.group_size, x.is_cuda):
            return grouped_experts_forward(
                x, topk_ids, topk_weights, self.layout, layer._parameters, intermediate_dim=self.intermediate,
                activation=activation, **kwargs,
            )  # fmt: skip
        if cpu_moe.available(self.layout, x):
            return cpu_moe.experts_forward(
                x, topk_ids, topk_weights, self.layout, layer._parameters, intermediate_dim=self.intermediate,
                activation=activation, **kwargs,
            )  # fmt: skip
        from transformers.activations import ACT2FN

        return experts_reference(x, topk_ids, topk_weights, self.layout, layer._parameters,
                                 act_fn=ACT2FN[activation], **kwargs)  # fmt: skip


class MoeqLinearMethod(LinearMethodBase):
    """A dense linear stored packed at ``bits`` (``attention_bits``): vLLM's own weight loaders
    place the checkpoint's fields by their ``output_dim`` (last axis, unpacked: a fused linear's
    parts and column-parallel shards are slices there) and ``input_dim`` (packed by 16 or 32 per
    word and one group per scale: row-parallel shards must fall on groups and 32-input blocks).
    Integer zeros (packed along the output axis) are unpacked to float16 as they load, so that the
    loaders can place them the same way: a dense linear's zeros are a small part of the model."""

    def __init__(self, quant_config: MoeqVllmConfig, bits: int, prefix: str):
        self.quant_config, self.bits, self.prefix = quant_config, bits, prefix

    def create_weights(
        self, layer, input_size_per_partition, output_partition_sizes, input_size, output_size, params_dtype,
        **extra_weight_attrs,
    ):  # fmt: skip
        group_size, name = self.quant_config.group_size, self.prefix
        if input_size_per_partition != input_size:
            check_tensor_parallel(input_size, group_size, input_size // input_size_per_partition, name, "inputs")
        layout = PackedLayout.single(self.bits, sum(output_partition_sizes), input_size_per_partition, group_size,
                                     name=name)  # fmt: skip
        vllm_loader = extra_weight_attrs.pop("weight_loader")
        for tensor_name, (shape, dtype) in layout.specs().items():
            convert = self._float_zeros if self.quant_config.integer_zeros and tensor_name.endswith("_zero") else None
            loader = _checked_loader(vllm_loader, f"{name}.{tensor_name}", convert=convert)
            attrs = {**extra_weight_attrs, "output_dim": len(shape) - 1, "input_dim": len(shape) - 2}
            _register_field(layer, tensor_name, shape, dtype, loader, len(output_partition_sizes), attrs)
        layer.moeq_layout = layout

    def _float_zeros(self, loaded: torch.Tensor) -> torch.Tensor:
        """A stored part's integer zeros [K/G, words] as float16 [K/G, N] (N a multiple of 32: b bits
        each, no padding; any other N does not fit the field and is named by the loader)."""
        if loaded.dtype != torch.int32:
            return loaded
        n = 32 * loaded.shape[-1] // self.bits
        if zero_words(self.bits, n) != loaded.shape[-1]:
            return loaded
        return unpack_zero_codes(loaded, self.bits, n).to(torch.float16)

    def process_weights_after_loading(self, layer) -> None:
        _refuse_unloaded(layer, layer.moeq_layout.specs(), self.prefix)

    def apply(self, layer, x, bias=None):
        layout, tensors = layer.moeq_layout, layer._parameters
        if use_triton("auto", layout.group_size, x.is_cuda):
            out = triton_linear_forward(x, layout, tensors)
        elif cpu_moe.available(layout, x):
            out = cpu_moe.linear_forward(x, layout, tensors)
        else:
            out = packed_linear(x, layout.packed(tensors, "weight", self.bits))
        return out if bias is None else out + bias.to(out.dtype)


class MoeqBnbLinearMethod(LinearMethodBase):
    """A dense linear in bitsandbytes' formats as optimum-moeq saves them (``attention_method``
    "bnb_nf4": ``weight_nf4`` two codes a byte and ``weight_absmax`` per 64 of the row-major weight,
    ``weight_quant_map``; "bnb_int8": ``weight_int8`` [N, K], ``weight_row_scale`` [N]). The flat
    NF4 tensors are held as [N, K/2] and [N, K/64] (each row whole blocks: K is a multiple of 64), so
    vLLM's loaders stack a fused linear's parts and slice shards by rows and columns as for a plain
    weight. Computed as the transformers module does: dequantized by bitsandbytes, then a matmul."""

    def __init__(self, method: str, prefix: str):
        self.method, self.prefix = method, prefix

    def create_weights(
        self, layer, input_size_per_partition, output_partition_sizes, input_size, output_size, params_dtype,
        **extra_weight_attrs,
    ):  # fmt: skip
        n, k, name = sum(output_partition_sizes), input_size_per_partition, self.prefix
        if self.method == "bnb_nf4" and (input_size % NF4_BLOCK or k % NF4_BLOCK):
            raise ValueError(
                f"{name}: NF4 blocks of {NF4_BLOCK} must not straddle rows or shards, but the linear has {input_size} "
                f"inputs ({k} on this rank): serve it without tensor parallelism or re-save with attention_bits."
            )
        if self.method == "bnb_nf4":
            specs = {"weight_nf4": ((n, k // 2), torch.uint8, 1),
                     "weight_absmax": ((n, k // NF4_BLOCK), torch.float32, 1),
                     "weight_quant_map": ((16,), torch.float32, None)}  # fmt: skip
            stored_width = {"weight_nf4": input_size // 2, "weight_absmax": input_size // NF4_BLOCK}
        else:
            specs = {"weight_int8": ((n, k), torch.int8, 1), "weight_row_scale": ((n,), torch.float32, None)}
            stored_width = {}
        vllm_loader = extra_weight_attrs.pop("weight_loader")
        for tensor_name, (shape, dtype, input_dim) in specs.items():
            if tensor_name == "weight_quant_map":  # one NF4 map for every part and rank

                def loader(param, loaded, shard_id=None):
                    if param.moeq_loaded and not torch.equal(param.data, loaded.to(param.dtype)):
                        raise ValueError(
                            f"{name}: the parts of this fused linear were stored with different NF4 maps."
                        )
                    param.data.copy_(loaded)
                    param.moeq_loaded.add(shard_id)

                _register_field(layer, tensor_name, shape, dtype, loader, 1, extra_weight_attrs)
                continue
            loader = _checked_loader(vllm_loader, f"{name}.{tensor_name}", stored_width.get(tensor_name))
            attrs = {**extra_weight_attrs, "output_dim": 0, **({} if input_dim is None else {"input_dim": input_dim})}
            _register_field(layer, tensor_name, shape, dtype, loader, len(output_partition_sizes), attrs)
        layer.moeq_specs, layer.moeq_shape = list(specs), (n, k)

    def process_weights_after_loading(self, layer) -> None:
        _refuse_unloaded(layer, layer.moeq_specs, self.prefix)

    def apply(self, layer, x, bias=None):
        if self.method == "bnb_nf4":
            weight = dequantize_nf4(layer.weight_nf4, layer.weight_absmax, layer.weight_quant_map, layer.moeq_shape)
        else:
            weight = dequantize_int8(layer.weight_int8, layer.weight_row_scale)
        out = torch.nn.functional.linear(x.float(), weight.to(x.device)).to(x.dtype)
        return out if bias is None else out + bias.to(out.dtype)


def _checked_loader(vllm_loader, disk_name: str, stored_width: int | None = None, convert=None):
    """vLLM's loader for one quantized field of a linear, with transformers' one-line error for a
    stored dtype or shape that does not fit (vLLM's loaders assert equal shapes, with no message),
    noting each part it loads for ``_refuse_unloaded``. ``stored_width``: the field is flat on disk,
    its rows of that width being the weight's rows. ``convert``: applied to each part first."""

    def weight_loader(param, loaded, shard_id=None):
        where = disk_name if shard_id is None else f"{disk_name} (part {shard_id})"
        if convert is not None:
            loaded = convert(loaded)
        if loaded.dtype != param.dtype:
            raise stored_mismatch(where, loaded.dtype, loaded.shape, param.dtype, param.shape)
        if stored_width is not None:
            loaded = loaded.reshape(-1, stored_width)
        try:
            vllm_loader(param, loaded, *([] if shard_id is None else [shard_id]))
        except AssertionError:
            raise stored_mismatch(where, loaded.dtype, loaded.shape, param.dtype, param.shape) from None
        param.moeq_loaded.add(shard_id)

    return weight_loader


def _register_field(layer, tensor_name: str, shape, dtype, weight_loader, parts: int, attrs: dict) -> None:
    """An empty parameter for one stored field, loaded by ``weight_loader`` in ``parts`` parts."""
    param = torch.nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)
    param.moeq_loaded = set()
    layer.register_parameter(tensor_name, param)
    set_weight_attrs(param, {**attrs, "weight_loader": weight_loader, "moeq_parts": parts})


def _refuse_unloaded(layer, names, prefix: str) -> None:
    """vLLM tracks unloaded parameters only for unquantized models: refuse what the checkpoint lacked."""
    missing = [n for n in names if len(getattr(layer, n).moeq_loaded) < getattr(layer, n).moeq_parts]
    if missing:
        raise ValueError(
            f"{prefix}: the checkpoint lacks {', '.join(missing)} (or a part of it): it does not belong to "
            "this config.json (re-save the model with optimum-moeq)."
        )


__all__ = ["MoeqBnbLinearMethod", "MoeqFusedMoEMethod", "MoeqLinearMethod", "MoeqVllmConfig"]
