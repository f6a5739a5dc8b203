"""Host side of the Triton MoE kernels: block sizes, launches, and a whole experts layer.

A layer runs as: gate_up (one launch per bit-width, SiLU(gate) * up fused) -> down (one launch
per bit-width, routing weight fused, float32 partial sums per pair) -> sum over top-k.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Mapping

import torch
from transformers.activations import ACT2FN

from ..quant.packed import PackedProjection
from .routing import align_pairs_by_expert
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


def grouped_experts_forward(
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up: Mapping[int, PackedProjection],
    down: Mapping[int, PackedProjection],
    local_index: Mapping[int, torch.Tensor],
    *,
    num_experts: int,
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
    num_pairs = tokens * top_k
    pair_expert = top_k_index.reshape(-1).to(torch.int32).contiguous()
    weights = top_k_weights.reshape(-1).contiguous()
    x = hidden_states.contiguous()
    blocks = None
    tuning = current_tuning()
    if num_pairs > tuning.decode_max_pairs:
        block_m = tuning.gemm_block_m_small if num_pairs <= 8 * num_experts else tuning.gemm_block_m
        blocks = align_pairs_by_expert(pair_expert, num_experts, block_m)
    fuse = gated and activation == "silu"
    width = intermediate_dim if fuse or not gated else 2 * intermediate_dim
    act = torch.zeros(num_pairs, width, dtype=x.dtype, device=x.device)
    for bits, packed in gate_up.items():
        launch_projection(
            x, act, packed, local_index[bits], pair_expert, group_size=group_size, n_out=width,
            x_rows_per_pair_div=top_k, fuse_swiglu=fuse, blocks=blocks,
        )  # fmt: skip
    if not fuse:
        act_fn = ACT2FN[activation]
        act = act_fn(act[:, :intermediate_dim]) * act[:, intermediate_dim:] if gated else act_fn(act)
    out = torch.zeros(num_pairs, hidden, dtype=torch.float32, device=x.device)
    for bits, packed in down.items():
        launch_projection(
            act, out, packed, local_index[bits], pair_expert, group_size=group_size, n_out=hidden,
            x_rows_per_pair_div=1, routing_weights=weights, blocks=blocks,
        )  # fmt: skip
    return out.view(tokens, top_k, hidden).sum(dim=1).to(hidden_states.dtype)
