"""Host side of the Triton MoE kernels: block sizes, launches, and a whole experts layer.

A layer runs as: gate_up (one launch per bit-width, SiLU(gate) * up fused) -> down (one launch
per bit-width, routing weight fused, float32 partial sums per pair) -> sum over top-k.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Mapping, Sequence

import torch
from transformers.activations import ACT2FN

from ..quant.packed import PackedProjection
from .routing import ExpertBlocks, align_pairs_by_expert
from .tuning import current_tuning


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def block_k_for(group_size: int) -> int | None:
    """Largest power of two <= 128 dividing ``group_size`` (one group per K step), or None if < 16."""
    block = 128
    while block >= 16:
        if group_size % block == 0:
            return block
        block //= 2
    return None


@functools.cache
def _kernels():
    from . import triton_moe

    return triton_moe


def _plane_args(packed: PackedProjection) -> tuple:
    q2 = packed.q2 if packed.q2 is not None else packed.scale  # unread when absent; any tensor will do
    q1 = packed.q1 if packed.q1 is not None else packed.scale
    for t in (packed.q2, packed.q1, packed.scale, packed.zero):
        if t is not None and not t.is_contiguous():
            raise ValueError("packed expert tensors must be contiguous for the Triton kernels.")
    q2_strides = packed.q2.stride()[:3] if packed.q2 is not None else (0, 0, 0)
    q1_strides = packed.q1.stride()[:2] if packed.q1 is not None else (0, 0)
    strides = (*q2_strides, *q1_strides, packed.scale.stride(0), packed.scale.stride(1))
    return (q2, q1, packed.scale, packed.zero), strides


def launch_projection(
    x: torch.Tensor,
    out: torch.Tensor,
    packed: PackedProjection,
    local_index: torch.Tensor,
    top_k_index: torch.Tensor,
    *,
    group_size: int,
    n_out: int,
    x_rows_per_pair_div: int,
    fuse_swiglu: bool = False,
    routing_weights: torch.Tensor | None = None,
    blocks=None,
) -> None:
    """One launch: every pair whose expert is in ``packed``'s bit-width writes its row of ``out``.

    ``x`` rows are indexed by pair // ``x_rows_per_pair_div``; ``out`` rows by pair. ``blocks``
    (from ``align_pairs_by_expert``) selects the tl.dot kernel, otherwise the GEMV kernel runs.
    """
    kernels = _kernels()
    tuning = current_tuning()
    num_pairs = top_k_index.numel()
    k = x.shape[1]
    block_k = block_k_for(group_size)
    tensors, strides = _plane_args(packed)
    n2 = packed.bits // 2
    has_q1 = packed.bits % 2 == 1
    routing = routing_weights if routing_weights is not None else out
    common = dict(GROUP=group_size, N2=n2, HAS_Q1=has_q1, FUSE_SWIGLU=fuse_swiglu)
    common["HAS_ROUTING_WEIGHT"] = routing_weights is not None
    if blocks is None:
        programs = num_pairs * triton_cdiv(n_out, tuning.gemv_block_n)
        # split-K adds partial sums atomically: only into float32 outputs, never with the fused
        # SiLU (it needs the whole sum)
        atomic_ok = not fuse_swiglu and out.dtype == torch.float32
        split_k = _split_k(programs, k // block_k, tuning.target_programs) if atomic_ok else 1
        grid = (num_pairs, triton_cdiv(n_out, tuning.gemv_block_n), split_k)
        kernels._moe_gemv_kernel[grid](
            x, out, top_k_index, local_index, routing, *tensors, k, n_out, x_rows_per_pair_div, n_out,
            x.stride(0), out.stride(0), *strides, **common, SPLIT_K=split_k, BLOCK_K=block_k,
            BLOCK_N=tuning.gemv_block_n, num_warps=tuning.gemv_warps,
        )  # fmt: skip
    else:
        grid = (blocks.block_expert.numel(), triton_cdiv(n_out, tuning.gemm_block_n))
        dot_in_fp32 = interpreting() and x.dtype == torch.bfloat16
        kernels._moe_gemm_kernel[grid](
            x, out, blocks.sorted_pairs, blocks.block_expert, local_index, routing, *tensors, num_pairs, k, n_out,
            x_rows_per_pair_div, n_out, x.stride(0), out.stride(0), *strides, **common, DOT_IN_FP32=dot_in_fp32,
            DOT_PRECISION=dot_input_precision(x.dtype), BLOCK_M=blocks.block_m, BLOCK_K=block_k,
            BLOCK_N=tuning.gemm_block_n, num_warps=tuning.gemm_warps, num_stages=tuning.gemm_stages,
        )  # fmt: skip


def dot_input_precision(dtype: torch.dtype) -> str:
    """tl.dot's input precision: float32 activations use TF32 tensor cores only where torch itself
    allows lower precision for float32 matmuls ("highest", the default, does not), else exact
    float32; it does not apply to 16-bit inputs. (The legacy allow_tf32 flag raises when the new
    fp32_precision API has been used, so the precision is read through this function.)"""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _split_k(programs: int, k_steps: int, target_programs: int) -> int:
    split = 1
    while programs * split * 2 <= target_programs and split * 2 <= k_steps:
        split *= 2
    return split


def local_expert_index(expert_bits: tuple[int, ...], bits: int, device: torch.device) -> torch.Tensor:
    """int32 [E + 1]: each expert's index within the ``bits``-bit tensors, or -1 (the extra slot is
    the index transformers gives experts held elsewhere). Made once per layout and device: a
    host-to-device copy in every forward would stall the stream and break CUDA-graph capture."""
    key = (expert_bits, bits, device)
    if key not in _local_indices:
        members = [e for e, b in enumerate(expert_bits) if b == bits]
        index = torch.full((len(expert_bits) + 1,), -1, dtype=torch.int32)
        index[members] = torch.arange(len(members), dtype=torch.int32)
        _local_indices[key] = index.to(device)
    return _local_indices[key]


_local_indices: dict[tuple, torch.Tensor] = {}


def _mixed_bit_projection(
    x: torch.Tensor,
    pair_expert: torch.Tensor,
    routing_weights: torch.Tensor | None,
    sorted_pairs: torch.Tensor | None,
    block_expert: torch.Tensor | None,
    planes: list[torch.Tensor | None],
    expert_bits: list[int],
    group_size: int,
    n_out: int,
    out_dtype: torch.dtype,
    x_rows_per_pair_div: int,
    fuse_swiglu: bool,
    block_m: int,
) -> torch.Tensor:
    out = torch.zeros(pair_expert.numel(), n_out, dtype=out_dtype, device=x.device)
    blocks = None if sorted_pairs is None else ExpertBlocks(sorted_pairs, block_expert, pair_expert.numel(), block_m)
    layout = tuple(expert_bits)
    for i, bits in enumerate(sorted(set(expert_bits))):
        q2, q1, scale, zero = planes[4 * i : 4 * i + 4]
        launch_projection(
            x, out, PackedProjection(bits, scale, zero, q2, q1), local_expert_index(layout, bits, x.device),
            pair_expert, group_size=group_size, n_out=n_out, x_rows_per_pair_div=x_rows_per_pair_div,
            fuse_swiglu=fuse_swiglu, routing_weights=routing_weights, blocks=blocks,
        )  # fmt: skip
    return out


# torch.compile sees the launches as one opaque op (tracing into Triton's launcher is not needed,
# and the interpreter cannot be traced at all); eager calls skip the dispatcher's ~20 us per call.
_mixed_bit_projection_op = torch.library.custom_op(
    "moeq::mixed_bit_projection", _mixed_bit_projection, mutates_args=()
)


@_mixed_bit_projection_op.register_fake
def _(x, pair_expert, routing_weights, sorted_pairs, block_expert, planes, expert_bits, group_size, n_out, out_dtype,
      x_rows_per_pair_div, fuse_swiglu, block_m):  # fmt: skip
    return x.new_empty((pair_expert.numel(), n_out), dtype=out_dtype)


def mixed_bit_projection(
    x: torch.Tensor,
    pair_expert: torch.Tensor,
    packed: Mapping[int, PackedProjection],
    expert_bits: Sequence[int],
    *,
    group_size: int,
    n_out: int,
    out_dtype: torch.dtype,
    x_rows_per_pair_div: int,
    fuse_swiglu: bool = False,
    routing_weights: torch.Tensor | None = None,
    blocks: ExpertBlocks | None = None,
) -> torch.Tensor:
    """Rows [pairs, ``n_out``] of ``out_dtype``: pair p's expert (``pair_expert[p]``, whose width is
    ``expert_bits[e]``) applied to ``x`` row p // ``x_rows_per_pair_div``; one launch per width in
    ``packed``. ``blocks`` (from ``align_pairs_by_expert``) selects the tl.dot kernel, else GEMV."""
    planes = [t for bits in sorted(packed) for t in (packed[bits].q2, packed[bits].q1, packed[bits].scale,
                                                     packed[bits].zero)]  # fmt: skip
    if sorted(packed) != sorted(set(expert_bits)):
        raise ValueError(
            f"packed widths {sorted(packed)} do not match the experts' widths {sorted(set(expert_bits))}."
        )
    sorted_pairs, block_expert, block_m = (None, None, 0) if blocks is None else (
        blocks.sorted_pairs, blocks.block_expert, blocks.block_m)  # fmt: skip
    project = _mixed_bit_projection_op if torch.compiler.is_compiling() else _mixed_bit_projection
    return project(
        x, pair_expert, routing_weights, sorted_pairs, block_expert, planes, list(expert_bits), group_size, n_out,
        out_dtype, x_rows_per_pair_div, fuse_swiglu, block_m,
    )  # fmt: skip


def blocks_for_prefill(pair_expert: torch.Tensor, num_experts: int) -> ExpertBlocks | None:
    """The decode/prefill switch: None (the GEMV kernel) at or below ``decode_max_pairs`` pairs, else
    the pairs sorted into blocks for the tl.dot kernel, short blocks when experts get few pairs each."""
    tuning = current_tuning()
    num_pairs = pair_expert.numel()
    if num_pairs <= tuning.decode_max_pairs:
        return None
    block_m = tuning.gemm_block_m_small if num_pairs <= 8 * num_experts else tuning.gemm_block_m
    return align_pairs_by_expert(pair_expert, num_experts, block_m)


def grouped_experts_forward(
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up: Mapping[int, PackedProjection],
    down: Mapping[int, PackedProjection],
    expert_bits: Sequence[int],
    *,
    intermediate_dim: int,
    group_size: int,
    activation: str = "silu",
    gated: bool = True,
) -> torch.Tensor:
    """Experts over packed mixed-bit weights; same contract as transformers' experts forward.

    ``gate_up`` holds the input projection: gate then up rows when ``gated``, else up only.
    SiLU(gate) * up is fused into its launch; other activations run in torch between launches.
    """
    tokens, hidden = hidden_states.shape
    top_k = top_k_index.shape[1]
    num_experts = len(expert_bits)
    pair_expert = top_k_index.reshape(-1).to(torch.int32).contiguous()
    x = hidden_states.contiguous()
    blocks = blocks_for_prefill(pair_expert, num_experts)
    fuse = gated and activation == "silu"
    width = intermediate_dim if fuse or not gated else 2 * intermediate_dim
    common = dict(group_size=group_size, blocks=blocks)
    act = mixed_bit_projection(
        x, pair_expert, gate_up, expert_bits, n_out=width, out_dtype=x.dtype, x_rows_per_pair_div=top_k,
        fuse_swiglu=fuse, **common,
    )  # fmt: skip
    if not fuse:
        act_fn = ACT2FN[activation]
        act = act_fn(act[:, :intermediate_dim]) * act[:, intermediate_dim:] if gated else act_fn(act)
    out = mixed_bit_projection(
        act, pair_expert, down, expert_bits, n_out=hidden, out_dtype=torch.float32, x_rows_per_pair_div=1,
        routing_weights=top_k_weights.reshape(-1).contiguous(), **common,
    )  # fmt: skip
    return out.view(tokens, top_k, hidden).sum(dim=1).to(hidden_states.dtype)
