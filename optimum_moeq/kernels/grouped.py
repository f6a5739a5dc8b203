"""Host side of the Triton MoE kernels: block sizes, launches, and a whole experts layer.

A layer runs as: gate_up (one launch per bit-width, SiLU(gate) * up fused) -> down (one launch
per bit-width, routing weight fused, float32 partial sums per pair) -> sum over top-k. With
``KernelTuning(gemv_kernel="dp4a")`` a decode projection quantizes its activations first (one
launch), splits K for gate_up too, and applies SwiGLU after the splits are summed.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from collections.abc import Mapping, Sequence

import torch
from transformers.activations import ACT2FN

from ..quant.layout import PackedLayout
from .activation_quant import QuantizedActivations
from .routing import ExpertBlocks, align_pairs_by_expert
from .tuning import current_tuning


@functools.cache  # asked in every forward of every packed module
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


def use_triton(kernel: str, group_size: int, is_cuda: bool) -> bool:
    """The compute path of a packed module: Triton for CUDA inputs (or when ``kernel="triton"``
    forces it), the torch reference otherwise."""
    if kernel == "torch":
        return False
    usable = triton_available() and block_k_for(group_size) is not None
    if kernel == "triton" and not usable:
        raise ValueError(
            f"kernel='triton' needs the triton package and a group_size with a power-of-two divisor >= 16, "
            f"got group_size={group_size}; install optimum-moeq[gpu] or use kernel='torch'."
        )
    return kernel == "triton" or (usable and is_cuda)


@functools.cache
def _kernels():
    from . import triton_moe

    return triton_moe


def _plane_args(q2, q1, scale, zero) -> tuple:
    """The kernels' tensor arguments, their strides (ending with the zeros' and, for integer zeros,
    the words per 2-bit plane of a group's row) and whether the zeros are integers."""
    for t in (q2, q1, scale, zero):
        if t is not None and not t.is_contiguous():
            raise ValueError("packed expert tensors must be contiguous for the Triton kernels.")
    q2_strides = q2.stride()[:3] if q2 is not None else (0, 0, 0)
    q1_strides = q1.stride()[:2] if q1 is not None else (0, 0)
    int_zero = not zero.dtype.is_floating_point
    zero_plane_words = triton_cdiv(scale.shape[-1], 16) if int_zero else 0
    strides = (*q2_strides, *q1_strides, scale.stride(0), scale.stride(1), zero.stride(0), zero.stride(1),
               zero_plane_words)  # fmt: skip
    # an absent plane is never read; any tensor will do as its argument
    return (scale if q2 is None else q2, scale if q1 is None else q1, scale, zero), strides, int_zero


def launch_projection(
    x: torch.Tensor,
    out: torch.Tensor,
    bits: int,
    planes: Sequence[torch.Tensor | None],
    local_index: torch.Tensor,
    top_k_index: torch.Tensor,
    *,
    group_size: int,
    n_out: int,
    x_rows_per_pair_div: int,
    fuse_swiglu: bool = False,
    routing_weights: torch.Tensor | None = None,
    sorted_pairs: torch.Tensor | None = None,
    block_expert: torch.Tensor | None = None,
    block_m: int = 0,
) -> None:
    """One launch: every pair whose expert has ``bits`` bits writes its row of ``out``; ``planes``
    are that width's (q2, q1, scale, zero) with the expert axis.

    ``x`` rows are indexed by pair // ``x_rows_per_pair_div``; ``out`` rows by pair. Pairs sorted
    into blocks (``sorted_pairs``, ``block_expert``, ``block_m`` from ``align_pairs_by_expert``)
    select the tl.dot kernel, otherwise the GEMV kernel runs.
    """
    kernels = _kernels()
    tuning = current_tuning()
    num_pairs = top_k_index.numel()
    k = x.shape[1]
    block_k = block_k_for(group_size)
    tensors, strides, int_zero = _plane_args(*planes)
    routing = routing_weights if routing_weights is not None else out
    common = dict(GROUP=group_size, N2=bits // 2, HAS_Q1=bits % 2 == 1, INT_ZERO=int_zero, FUSE_SWIGLU=fuse_swiglu,
                  enable_fp_fusion=FP_FUSION)  # fmt: skip
    common["HAS_ROUTING_WEIGHT"] = routing_weights is not None
    if sorted_pairs is None:
        programs = num_pairs * triton_cdiv(n_out, tuning.gemv_block_n)
        # split-K adds partial sums atomically: only into float32 outputs, never with the fused
        # SiLU (it needs the whole sum)
        atomic_ok = not fuse_swiglu and out.dtype == torch.float32
        split_k = _split_k(programs, k // block_k, tuning.target_programs) if atomic_ok else 1
        grid = (num_pairs, triton_cdiv(n_out, tuning.gemv_block_n), split_k)
        kernels._moe_gemv_kernel[grid](
            x, out, top_k_index, local_index, routing, *tensors, local_index.numel(), k, n_out, x_rows_per_pair_div,
            n_out, x.stride(0), out.stride(0), *strides, **common, SPLIT_K=split_k, BLOCK_K=block_k,
            BLOCK_N=tuning.gemv_block_n, num_warps=tuning.gemv_warps,
        )  # fmt: skip
    else:
        grid = (block_expert.numel(), triton_cdiv(n_out, tuning.gemm_block_n))
        dot_in_fp32 = interpreting() and x.dtype == torch.bfloat16
        kernels._moe_gemm_kernel[grid](
            x, out, sorted_pairs, block_expert, local_index, routing, *tensors, num_pairs, k, n_out,
            x_rows_per_pair_div, n_out, x.stride(0), out.stride(0), *strides, **common, DOT_IN_FP32=dot_in_fp32,
            DOT_PRECISION=dot_input_precision(x.dtype), BLOCK_M=block_m, BLOCK_K=block_k,
            BLOCK_N=tuning.gemm_block_n, num_warps=tuning.gemm_warps, num_stages=tuning.gemm_stages,
        )  # fmt: skip


# Multiply-adds fused (FMA): pinned, since Triton's default changed (off from 3.10) and with it the
# kernels' rounding and instruction counts; the offline compile (resources.py) uses the same.
FP_FUSION = True


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


def dp4a_applies(dtype: torch.dtype, group_size: int) -> bool:
    """Decode takes the integer-dot-product kernel for 16-bit activations (float32 ones keep the
    exact float kernel) when a K step holds whole 1-bit words (32 rows) and the tuning asks for it."""
    block_k = block_k_for(group_size)
    return (
        current_tuning().gemv_kernel == "dp4a"
        and dtype in (torch.bfloat16, torch.float16)
        and (block_k is not None and block_k % 32 == 0)
    )


def _dp4a_projection(x, pair_expert, routing_weights, planes, local_indices, bit_widths, group_size, n_out,
                     out_dtype, x_rows_per_pair_div, fuse_swiglu) -> torch.Tensor:  # fmt: skip
    """Decode GEMV on activations quantized per K step (``activation_quant``): every width's
    launch adds float32 partial sums (split K, gate_up included), then SwiGLU when fused."""
    kernels = _kernels()
    tuning = current_tuning()
    num_pairs, k = pair_expert.numel(), x.shape[1]
    block_k = block_k_for(group_size)
    acts = _quantized_activations(x, block_k, tuning.activation_digits)
    out = torch.zeros(num_pairs, 2 * n_out if fuse_swiglu else n_out, dtype=torch.float32, device=x.device)
    n_tiles = triton_cdiv(n_out, tuning.dp4a_block_n)
    split_k = _split_k(num_pairs * n_tiles, k // block_k, tuning.target_programs)
    routing = routing_weights if routing_weights is not None else out
    for i, bits in enumerate(bit_widths):
        tensors, strides, int_zero = _plane_args(*planes[4 * i : 4 * i + 4])
        local_index = local_indices[i]
        kernels._moe_gemv_dp4a_kernel[(num_pairs, n_tiles, split_k)](
            acts.xp2, acts.xp1, acts.x_scale, acts.x_sum, out, pair_expert, local_index, routing, *tensors,
            local_index.numel(), k, n_out, x_rows_per_pair_div, n_out, acts.xp2.stride(0), acts.xp1.stride(0),
            acts.x_scale.stride(0), out.stride(0), *strides, GROUP=group_size, N2=bits // 2, HAS_Q1=bits % 2 == 1,
            INT_ZERO=int_zero,
            DIGITS=tuning.activation_digits, GATE_AND_UP=fuse_swiglu, HAS_ROUTING_WEIGHT=routing_weights is not None,
            SPLIT_K=split_k, BLOCK_K=block_k, BLOCK_N=tuning.dp4a_block_n,
            USE_ASM=tuning.dp4a_asm and not interpreting(), num_warps=tuning.dp4a_warps, enable_fp_fusion=FP_FUSION,
        )  # fmt: skip
    if fuse_swiglu:
        out = torch.nn.functional.silu(out[:, :n_out]) * out[:, n_out:]
    return out.to(out_dtype)


def _quantized_activations(x: torch.Tensor, block_k: int, digits: int) -> QuantizedActivations:
    """``activation_quant.quantize_activations`` (the reference) in one launch."""
    rows, k = x.shape
    acts = QuantizedActivations(
        torch.empty(rows, k // 16, 4 * digits, dtype=torch.int32, device=x.device),
        torch.empty(rows, k // 32, 8 * digits, dtype=torch.int32, device=x.device),
        torch.empty(rows, k // block_k, dtype=torch.float32, device=x.device),
        torch.empty(rows, k // block_k, dtype=torch.float32, device=x.device),
    )
    _kernels()._moe_quantize_activations_kernel[(rows, k // block_k)](
        x, *acts, x.stride(0), acts.xp2.stride(0), acts.xp1.stride(0), acts.x_scale.stride(0), DIGITS=digits,
        BLOCK_K=block_k, num_warps=1, enable_fp_fusion=FP_FUSION,
    )  # fmt: skip
    return acts


def _split_k(programs: int, k_steps: int, target_programs: int) -> int:
    split = 1
    while programs * split * 2 <= target_programs and split * 2 <= k_steps:
        split *= 2
    return split


def _mixed_bit_projection(
    x: torch.Tensor,
    pair_expert: torch.Tensor,
    routing_weights: torch.Tensor | None,
    sorted_pairs: torch.Tensor | None,
    block_expert: torch.Tensor | None,
    planes: list[torch.Tensor | None],
    local_indices: list[torch.Tensor],
    bit_widths: list[int],
    group_size: int,
    n_out: int,
    out_dtype: torch.dtype,
    x_rows_per_pair_div: int,
    fuse_swiglu: bool,
    block_m: int,
) -> torch.Tensor:
    # Triton launches on the current device and its stream, not the tensors' (triton-lang/triton#5205)
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        if sorted_pairs is None and dp4a_applies(x.dtype, group_size):
            return _dp4a_projection(x, pair_expert, routing_weights, planes, local_indices, bit_widths, group_size,
                                    n_out, out_dtype, x_rows_per_pair_div, fuse_swiglu)  # fmt: skip
        out = torch.zeros(pair_expert.numel(), n_out, dtype=out_dtype, device=x.device)
        for i, bits in enumerate(bit_widths):
            launch_projection(
                x, out, bits, planes[4 * i : 4 * i + 4], local_indices[i], pair_expert, group_size=group_size,
                n_out=n_out, x_rows_per_pair_div=x_rows_per_pair_div, fuse_swiglu=fuse_swiglu,
                routing_weights=routing_weights, sorted_pairs=sorted_pairs, block_expert=block_expert,
                block_m=block_m,
            )  # fmt: skip
        return out


# torch.compile sees the launches as one opaque op (tracing into Triton's launcher is not needed,
# and the interpreter cannot be traced at all); eager calls skip the dispatcher's cost per call.
_mixed_bit_projection_op = torch.library.custom_op(
    "moeq::mixed_bit_projection", _mixed_bit_projection, mutates_args=()
)


@_mixed_bit_projection_op.register_fake
def _(x, pair_expert, routing_weights, sorted_pairs, block_expert, planes, local_indices, bit_widths, group_size,
      n_out, out_dtype, x_rows_per_pair_div, fuse_swiglu, block_m):  # fmt: skip
    return x.new_empty((pair_expert.numel(), n_out), dtype=out_dtype)


def mixed_bit_projection(
    x: torch.Tensor,
    pair_expert: torch.Tensor,
    layout: PackedLayout,
    planes: list[torch.Tensor | None],
    *,
    n_out: int,
    out_dtype: torch.dtype,
    x_rows_per_pair_div: int,
    fuse_swiglu: bool = False,
    routing_weights: torch.Tensor | None = None,
    blocks: ExpertBlocks | None = None,
) -> torch.Tensor:
    """Rows [pairs, ``n_out``] of ``out_dtype``: pair p's expert (``pair_expert[p]``) applied to ``x``
    row p // ``x_rows_per_pair_div``; one launch per width of ``layout``, whose tensors ``planes``
    holds as ``layout.kernel_planes`` flattens them. ``blocks`` (from ``align_pairs_by_expert``)
    selects the tl.dot kernel, else GEMV. This is the custom-op boundary: arguments go to the
    launches as they are."""
    sorted_pairs, block_expert, block_m = (None, None, 0) if blocks is None else (
        blocks.sorted_pairs, blocks.block_expert, blocks.block_m)  # fmt: skip
    project = _mixed_bit_projection_op if torch.compiler.is_compiling() else _mixed_bit_projection
    return project(
        x, pair_expert, routing_weights, sorted_pairs, block_expert, planes, layout.local_indices(x.device),
        list(layout.bit_widths), layout.group_size, n_out, out_dtype, x_rows_per_pair_div, fuse_swiglu, block_m,
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
    layout: PackedLayout,
    tensors: Mapping[str, torch.Tensor],
    *,
    input_projection: str,
    intermediate_dim: int,
    activation: str = "silu",
    gated: bool = True,
) -> torch.Tensor:
    """Experts over packed mixed-bit weights (``tensors`` by ``layout``'s names); same contract as
    transformers' experts forward.

    ``input_projection`` holds gate then up rows when ``gated``, else up only. SiLU(gate) * up is
    fused into its launch; other activations run in torch between launches.
    """
    tokens, hidden = hidden_states.shape
    top_k = top_k_index.shape[1]
    pair_expert = top_k_index.reshape(-1).to(torch.int32).contiguous()
    x = hidden_states.contiguous()
    blocks = blocks_for_prefill(pair_expert, layout.num_experts)
    fuse = gated and activation == "silu"
    width = intermediate_dim if fuse or not gated else 2 * intermediate_dim
    act = mixed_bit_projection(
        x, pair_expert, layout, layout.kernel_planes(tensors, input_projection), n_out=width, out_dtype=x.dtype,
        x_rows_per_pair_div=top_k, fuse_swiglu=fuse, blocks=blocks,
    )  # fmt: skip
    if not fuse:
        act_fn = ACT2FN[activation]
        act = act_fn(act[:, :intermediate_dim]) * act[:, intermediate_dim:] if gated else act_fn(act)
    out = mixed_bit_projection(
        act, pair_expert, layout, layout.kernel_planes(tensors, "down_proj"), n_out=hidden, out_dtype=torch.float32,
        x_rows_per_pair_div=1, routing_weights=top_k_weights.reshape(-1).contiguous(), blocks=blocks,
    )  # fmt: skip
    return out.view(tokens, top_k, hidden).sum(dim=1).to(hidden_states.dtype)
