"""Triton kernels: one launch per bit-width per projection for all experts of that width.

Both kernels read the packed layout of ``quant/packed.py`` and dequantize inside the loop,
one group of K rows per step so that each step needs one row of scales and zeros, with the zero
folded out of the inner product: ``sum_k x_k (q_kn - z_n) s_n = s_n (sum_k x_k q_kn - z_n sum_k x_k)``.

* ``_moe_gemv_kernel`` (decode, a few tokens): one program per (pair, N tile, K split);
  the expert is read on the device from the routing tensor (ids outside [0, E) are skipped, their
  output rows stay zero); split-K partial sums are added atomically in float32.
* ``_moe_gemm_kernel`` (prefill): pairs sorted by expert into blocks of BLOCK_M rows
  (``routing.align_pairs_by_expert``), ``tl.dot`` tiles.

With ``FUSE_SWIGLU`` a program computes gate columns n and up columns n + I of the fused
gate_up projection and writes SiLU(gate) * up; with ``HAS_ROUTING_WEIGHT`` the output rows are
scaled by the pair's routing weight. Programs whose expert has another bit-width exit at once.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _group_zero(zero_ptr, group, offs_n, n_mask, stride_zero_row, ZERO_PLANE_WORDS, N2: tl.constexpr,
                HAS_Q1: tl.constexpr, INT_ZERO: tl.constexpr):  # fmt: skip
    """The zero points [BLOCK_N] of columns offs_n in group ``group``, float32: float16 values, or
    (INT_ZERO) b-bit integers packed along N, each 2-bit plane's ZERO_PLANE_WORDS words (16 columns
    a word) then the 1-bit plane's (32 a word)."""
    row = zero_ptr + group * stride_zero_row
    if INT_ZERO:
        zero = tl.zeros(offs_n.shape, dtype=tl.int32)
        for i in tl.static_range(N2):
            words = tl.load(row + i * ZERO_PLANE_WORDS + offs_n // 16, mask=n_mask, other=0)
            zero |= ((words >> (2 * (offs_n % 16))) & 3) << (2 * i)
        if HAS_Q1:
            words = tl.load(row + N2 * ZERO_PLANE_WORDS + offs_n // 32, mask=n_mask, other=0)
            zero |= ((words >> (offs_n % 32)) & 1) << (2 * N2)
        return zero.to(tl.float32)
    return tl.load(row + offs_n, mask=n_mask, other=0).to(tl.float32)


@triton.jit
def _dequant_tile(
    q2_ptr,
    q1_ptr,
    scale_ptr,
    zero_ptr,
    k0,
    offs_n,
    n_mask,
    stride_q2_plane,
    stride_q2_row,
    stride_q1_row,
    stride_meta_row,
    stride_zero_row,
    ZERO_PLANE_WORDS,
    GROUP: tl.constexpr,
    N2: tl.constexpr,
    HAS_Q1: tl.constexpr,
    INT_ZERO: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Codes [BLOCK_K, BLOCK_N] (int32) of rows k0.. and the group's scale and zero [BLOCK_N].

    Each word is loaded once, as [BLOCK_K / 16, BLOCK_N], and split into its 16 rows in registers:
    loading it once per row (16 times) made the pipeliner stage [BLOCK_K, BLOCK_N] int32 tiles in
    shared memory, more than an H100 has at 3 bits and up."""
    WORDS: tl.constexpr = BLOCK_K // 16
    word_rows = k0 // 16 + tl.arange(0, WORDS)
    row_in_word = tl.arange(0, 16)  # k = word_row * 16 + row_in_word
    codes = tl.zeros((WORDS, 16, BLOCK_N), dtype=tl.int32)
    for i in tl.static_range(N2):
        words = tl.load(
            q2_ptr + i * stride_q2_plane + word_rows[:, None] * stride_q2_row + offs_n[None, :],
            mask=n_mask[None, :],
            other=0,
            eviction_policy="evict_first",  # weights are read once; keep activations in cache
        )
        codes |= ((words[:, None, :] >> (2 * row_in_word)[None, :, None]) & 3) << (2 * i)
    if HAS_Q1:  # 32 rows per word: bit (k % 32) of word k // 32
        words = tl.load(
            q1_ptr + (word_rows // 2)[:, None] * stride_q1_row + offs_n[None, :],
            mask=n_mask[None, :],
            other=0,
            eviction_policy="evict_first",
        )
        shift = ((word_rows % 2) * 16)[:, None, None] + row_in_word[None, :, None]
        codes |= ((words[:, None, :] >> shift) & 1) << (2 * N2)
    codes = tl.reshape(codes, (BLOCK_K, BLOCK_N))
    group = k0 // GROUP
    scale = tl.load(scale_ptr + group * stride_meta_row + offs_n, mask=n_mask, other=0).to(tl.float32)
    zero = _group_zero(zero_ptr, group, offs_n, n_mask, stride_zero_row, ZERO_PLANE_WORDS, N2, HAS_Q1, INT_ZERO)
    return codes, scale, zero


@triton.jit
def _codes_as_floats(codes):
    """Exact float32 of small non-negative int codes without an int-to-float conversion: OR the
    code into the mantissa of 2**23 and subtract 2**23."""
    return (codes | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _codes_as_unit_floats(codes, BITS: tl.constexpr):
    """1 + code / 2**BITS, exactly, as float32, with no conversion instruction: the code goes into
    the top mantissa bits of 1.0 (a shift and an OR). Callers fold the 1 and the 2**BITS into the
    per-column scale and zero, which saves the subtraction a code -> float conversion needs."""
    return ((codes << (23 - BITS)) | 0x3F800000).to(tl.float32, bitcast=True)


@triton.jit
def _group_dot(x, x_sum, codes, scale, zero, BITS: tl.constexpr, EXACT: tl.constexpr):
    """sum_k x_k (c_kn - z_n) s_n over one group of rows, the zero folded out of the product.
    16-bit activations take the unit floats f = 1 + c / 2**b (one instruction fewer per weight):
    s 2^b sum_k x_k f_k - s (2^b + z) sum_k x_k. float32 activations keep exact codes: those two
    terms are about 2^b |x| each and their difference loses 2-5x more of float32's precision."""
    if EXACT:
        return scale * (tl.sum(x[:, None] * _codes_as_floats(codes), axis=0) - zero * x_sum)
    unit: tl.constexpr = 2.0**BITS
    return scale * (unit * tl.sum(x[:, None] * _codes_as_unit_floats(codes, BITS), axis=0) - (unit + zero) * x_sum)


@triton.jit
def _expert_tensors(q2_ptr, q1_ptr, scale_ptr, zero_ptr, local, stride_q2_expert, stride_q1_expert,
                    stride_meta_expert, stride_zero_expert):  # fmt: skip
    """Pointers to expert ``local``'s planes, scales and zeros within its width's tensors."""
    local = local.to(tl.int64)
    return (
        q2_ptr + local * stride_q2_expert,
        q1_ptr + local * stride_q1_expert,
        scale_ptr + local * stride_meta_expert,
        zero_ptr + local * stride_zero_expert,
    )


@triton.jit
def _pair_slot(pair_expert_ptr, local_index_ptr, pair, NUM_EXPERTS):
    """The pair's expert's slot within the launch's width, or -1 when the pair contributes nothing
    here: an expert id outside [0, E) (a dropped token, an expert held elsewhere; never read past
    the table) or an expert of another width."""
    expert = tl.load(pair_expert_ptr + pair)
    inside = (expert >= 0) & (expert < NUM_EXPERTS)
    return tl.load(local_index_ptr + expert, mask=inside, other=-1)


@triton.jit
def _tile_dot(x, q2_e, q1_e, scale_e, zero_e, k0, offs_n, n_mask, stride_q2_plane, stride_q2_row, stride_q1_row,
              stride_meta_row, stride_zero_row, ZERO_PLANE_WORDS, GROUP: tl.constexpr, N2: tl.constexpr,
              HAS_Q1: tl.constexpr, INT_ZERO: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
              DOT_IN_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr):  # fmt: skip
    """x [BLOCK_M, BLOCK_K] times the dequantized tile of rows k0.. and columns offs_n, on tensor cores."""
    BITS: tl.constexpr = 2 * N2 + HAS_Q1
    UNIT: tl.constexpr = 2.0**BITS
    codes, scale, zero = _dequant_tile(
        q2_e, q1_e, scale_e, zero_e, k0, offs_n, n_mask, stride_q2_plane, stride_q2_row, stride_q1_row,
        stride_meta_row, stride_zero_row, ZERO_PLANE_WORDS, GROUP, N2, HAS_Q1, INT_ZERO, BLOCK_K, BLOCK_N,
    )  # fmt: skip
    w = _codes_as_unit_floats(codes, BITS) * (UNIT * scale)[None, :] - ((UNIT + zero) * scale)[None, :]
    if DOT_IN_FP32:  # the interpreter's bfloat16 dot is wrong; GPUs take the native path
        return tl.dot(x.to(tl.float32), w)
    return tl.dot(x, w.to(x.dtype), input_precision=DOT_PRECISION)


# fmt: off
@triton.jit
def _moe_gemv_kernel(
    x_ptr, out_ptr, pair_expert_ptr, local_index_ptr, routing_weight_ptr, q2_ptr, q1_ptr, scale_ptr, zero_ptr,
    NUM_EXPERTS, K, N, X_ROWS_PER_PAIR_DIV, UP_OFFSET,
    stride_x, stride_out, stride_q2_expert, stride_q2_plane, stride_q2_row, stride_q1_expert, stride_q1_row,
    stride_meta_expert, stride_meta_row, stride_zero_expert, stride_zero_row, ZERO_PLANE_WORDS,
    GROUP: tl.constexpr, N2: tl.constexpr, HAS_Q1: tl.constexpr, INT_ZERO: tl.constexpr, FUSE_SWIGLU: tl.constexpr,
    HAS_ROUTING_WEIGHT: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # fmt: on
    BITS: tl.constexpr = 2 * N2 + HAS_Q1
    EXACT: tl.constexpr = x_ptr.dtype.element_ty == tl.float32
    pair = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    local = _pair_slot(pair_expert_ptr, local_index_ptr, pair, NUM_EXPERTS)
    if local < 0:
        return
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    x_row = x_ptr + (pair // X_ROWS_PER_PAIR_DIV).to(tl.int64) * stride_x
    q2_e, q1_e, scale_e, zero_e = _expert_tensors(
        q2_ptr, q1_ptr, scale_ptr, zero_ptr, local, stride_q2_expert, stride_q1_expert, stride_meta_expert,
        stride_zero_expert,
    )
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
        x = tl.load(x_row + k0 + tl.arange(0, BLOCK_K)).to(tl.float32)
        x_sum = tl.sum(x, axis=0)
        codes, scale, zero = _dequant_tile(
            q2_e, q1_e, scale_e, zero_e, k0, offs_n, n_mask, stride_q2_plane, stride_q2_row, stride_q1_row,
            stride_meta_row, stride_zero_row, ZERO_PLANE_WORDS, GROUP, N2, HAS_Q1, INT_ZERO, BLOCK_K, BLOCK_N,
        )  # fmt: skip
        acc += _group_dot(x, x_sum, codes, scale, zero, BITS, EXACT)
        if FUSE_SWIGLU:
            codes, scale, zero = _dequant_tile(
                q2_e, q1_e, scale_e, zero_e, k0, offs_n + UP_OFFSET, n_mask, stride_q2_plane, stride_q2_row,
                stride_q1_row, stride_meta_row, stride_zero_row, ZERO_PLANE_WORDS, GROUP, N2, HAS_Q1, INT_ZERO,
                BLOCK_K, BLOCK_N,
            )  # fmt: skip
            acc_up += _group_dot(x, x_sum, codes, scale, zero, BITS, EXACT)
    if FUSE_SWIGLU:
        acc = acc * tl.sigmoid(acc) * acc_up
    if HAS_ROUTING_WEIGHT:
        acc *= tl.load(routing_weight_ptr + pair).to(tl.float32)
    out = out_ptr + pair.to(tl.int64) * stride_out + offs_n
    if SPLIT_K == 1:
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=n_mask)
    else:
        tl.atomic_add(out, acc, mask=n_mask, sem="relaxed")  # partial sums need no ordering


# fmt: off
@triton.jit
def _moe_gemm_kernel(
    x_ptr, out_ptr, sorted_pairs_ptr, block_expert_ptr, local_index_ptr, routing_weight_ptr, q2_ptr, q1_ptr,
    scale_ptr, zero_ptr,
    num_pairs, K, N, X_ROWS_PER_PAIR_DIV, UP_OFFSET,
    stride_x, stride_out, stride_q2_expert, stride_q2_plane, stride_q2_row, stride_q1_expert, stride_q1_row,
    stride_meta_expert, stride_meta_row, stride_zero_expert, stride_zero_row, ZERO_PLANE_WORDS,
    GROUP: tl.constexpr, N2: tl.constexpr, HAS_Q1: tl.constexpr, INT_ZERO: tl.constexpr, FUSE_SWIGLU: tl.constexpr,
    HAS_ROUTING_WEIGHT: tl.constexpr, DOT_IN_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # fmt: on
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(block_expert_ptr + pid_m)
    if expert < 0:  # padding block
        return
    local = tl.load(local_index_ptr + expert)
    if local < 0:  # this expert has another bit-width
        return
    pairs = tl.load(sorted_pairs_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    m_mask = pairs < num_pairs
    x_rows = x_ptr + (pairs // X_ROWS_PER_PAIR_DIV).to(tl.int64)[:, None] * stride_x
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    q2_e, q1_e, scale_e, zero_e = _expert_tensors(
        q2_ptr, q1_ptr, scale_ptr, zero_ptr, local, stride_q2_expert, stride_q1_expert, stride_meta_expert,
        stride_zero_expert,
    )
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(x_rows + k0 + tl.arange(0, BLOCK_K)[None, :], mask=m_mask[:, None], other=0)
        acc += _tile_dot(
            x, q2_e, q1_e, scale_e, zero_e, k0, offs_n, n_mask, stride_q2_plane, stride_q2_row, stride_q1_row,
            stride_meta_row, stride_zero_row, ZERO_PLANE_WORDS, GROUP, N2, HAS_Q1, INT_ZERO, BLOCK_K, BLOCK_N,
            DOT_IN_FP32, DOT_PRECISION,
        )  # fmt: skip
        if FUSE_SWIGLU:
            acc_up += _tile_dot(
                x, q2_e, q1_e, scale_e, zero_e, k0, offs_n + UP_OFFSET, n_mask, stride_q2_plane, stride_q2_row,
                stride_q1_row, stride_meta_row, stride_zero_row, ZERO_PLANE_WORDS, GROUP, N2, HAS_Q1, INT_ZERO,
                BLOCK_K, BLOCK_N, DOT_IN_FP32, DOT_PRECISION,
            )  # fmt: skip
    if FUSE_SWIGLU:
        acc = acc * tl.sigmoid(acc) * acc_up
    if HAS_ROUTING_WEIGHT:
        acc *= tl.load(routing_weight_ptr + pairs, mask=m_mask, other=0).to(tl.float32)[:, None]
    out = out_ptr + pairs.to(tl.int64)[:, None] * stride_out + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


# ---- Decode as integer dot products (dp4a) -------------------------------------------------------
#
# The activations are quantized per block of BLOCK_K rows to int8 (DIGITS=1) or to two int8 digits,
# q = 128 hi + lo (DIGITS=2, about 15 bits), by ``activation_quant.quantize_activations``, and packed
# so that one int32 holds the four activations that meet the four codes one masked weight word
# holds in its bytes: a 2-bit word's rows 4b + j sit in byte b at bits 2j (mask-shift j), a 1-bit
# word's rows 8b + j at bit j. A word then costs, per position j, a shift, an AND and one dp4a.
# Codes times activations are exact int32 sums per block; the block's weight scale, activation
# scale and zero (through the block's sum of activations) apply once per block and column.


@triton.jit
def _dp4a(a, b, c, USE_ASM: tl.constexpr):
    """c + sum over the four bytes of ``a`` (unsigned) times those of ``b`` (signed), int32: one
    IDP.4A on sm_61+ through PTX, or the same integers in plain Triton (the interpreter's path)."""
    if USE_ASM:
        return tl.inline_asm_elementwise(
            "dp4a.u32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c], dtype=tl.int32, is_pure=True, pack=1
        )
    else:
        total = c
        for byte in tl.static_range(4):
            total += ((a >> (8 * byte)) & 0xFF) * ((b << (24 - 8 * byte)) >> 24)
        return total


@triton.jit
def _plane2_dot(q2_e, plane, word_rows, offs_n, n_mask, xp2_row, digit, stride_q2_plane, stride_q2_row,
                DIGITS: tl.constexpr, USE_ASM: tl.constexpr):  # fmt: skip
    """[WORDS, BLOCK_N] int32: per 2-bit word of the block, sum over its 16 rows of code x q."""
    words = tl.load(
        q2_e + plane * stride_q2_plane + word_rows[:, None] * stride_q2_row + offs_n[None, :],
        mask=n_mask[None, :], other=0, eviction_policy="evict_first",
    )  # fmt: skip
    acc = tl.zeros(words.shape, dtype=tl.int32)
    for j in tl.static_range(4):
        x = tl.load(xp2_row + word_rows * (4 * DIGITS) + digit * 4 + j)
        acc = _dp4a((words >> (2 * j)) & 0x03030303, x[:, None], acc, USE_ASM)
    return acc


@triton.jit
def _plane1_dot(q1_e, word_rows1, offs_n, n_mask, xp1_row, digit, stride_q1_row, DIGITS: tl.constexpr,
                USE_ASM: tl.constexpr):  # fmt: skip
    """[WORDS1, BLOCK_N] int32: per 1-bit word of the block, sum over its 32 rows of bit x q."""
    words = tl.load(
        q1_e + word_rows1[:, None] * stride_q1_row + offs_n[None, :],
        mask=n_mask[None, :], other=0, eviction_policy="evict_first",
    )  # fmt: skip
    acc = tl.zeros(words.shape, dtype=tl.int32)
    for j in tl.static_range(8):
        x = tl.load(xp1_row + word_rows1 * (8 * DIGITS) + digit * 8 + j)
        acc = _dp4a((words >> j) & 0x01010101, x[:, None], acc, USE_ASM)
    return acc


@triton.jit
def _block_codes_dot(q2_e, q1_e, k0, offs_n, n_mask, xp2_row, xp1_row, digit, stride_q2_plane, stride_q2_row,
                     stride_q1_row, N2: tl.constexpr, HAS_Q1: tl.constexpr, DIGITS: tl.constexpr,
                     BLOCK_K: tl.constexpr, USE_ASM: tl.constexpr):  # fmt: skip
    """[BLOCK_N] int32: sum over the block's rows of code x (one digit of) the quantized activation."""
    total = tl.zeros(offs_n.shape, dtype=tl.int32)
    if N2 > 0:  # 1-bit experts have no 2-bit plane
        word_rows = k0 // 16 + tl.arange(0, BLOCK_K // 16)
        two_bit = _plane2_dot(q2_e, 0, word_rows, offs_n, n_mask, xp2_row, digit, stride_q2_plane, stride_q2_row,
                              DIGITS, USE_ASM)  # fmt: skip
        for plane in tl.static_range(1, N2):
            two_bit += _plane2_dot(q2_e, plane, word_rows, offs_n, n_mask, xp2_row, digit, stride_q2_plane,
                                   stride_q2_row, DIGITS, USE_ASM) << (2 * plane)  # fmt: skip
        total += tl.sum(two_bit, axis=0)
    if HAS_Q1:
        word_rows1 = k0 // 32 + tl.arange(0, BLOCK_K // 32)
        one_bit = _plane1_dot(q1_e, word_rows1, offs_n, n_mask, xp1_row, digit, stride_q1_row, DIGITS, USE_ASM)
        total += tl.sum(one_bit, axis=0) << (2 * N2)
    return total


@triton.jit
def _block_dot_dp4a(q2_e, q1_e, scale_e, zero_e, k0, offs_n, n_mask, xp2_row, xp1_row, x_scale, x_sum,
                    stride_q2_plane, stride_q2_row, stride_q1_row, stride_meta_row, stride_zero_row,
                    ZERO_PLANE_WORDS, GROUP: tl.constexpr, N2: tl.constexpr, HAS_Q1: tl.constexpr,
                    INT_ZERO: tl.constexpr, DIGITS: tl.constexpr, BLOCK_K: tl.constexpr,
                    USE_ASM: tl.constexpr):  # fmt: skip
    """[BLOCK_N] float32: sum_k x_k (c_kn - z_n) s_n over the block of rows k0.., from the exact
    integer sum of codes x quantized activations: s_n x_scale (sum_k c q - z_n sum_k q)."""
    codes_q = _block_codes_dot(q2_e, q1_e, k0, offs_n, n_mask, xp2_row, xp1_row, 0, stride_q2_plane, stride_q2_row,
                               stride_q1_row, N2, HAS_Q1, DIGITS, BLOCK_K, USE_ASM).to(tl.float32)  # fmt: skip
    if DIGITS == 2:  # q = 128 hi + lo: the hi digit's sum (digit 0) weighs 128
        low = _block_codes_dot(q2_e, q1_e, k0, offs_n, n_mask, xp2_row, xp1_row, 1, stride_q2_plane, stride_q2_row,
                               stride_q1_row, N2, HAS_Q1, DIGITS, BLOCK_K, USE_ASM)  # fmt: skip
        codes_q = codes_q * 128.0 + low.to(tl.float32)
    group = k0 // GROUP
    scale = tl.load(scale_e + group * stride_meta_row + offs_n, mask=n_mask, other=0).to(tl.float32)
    zero = _group_zero(zero_e, group, offs_n, n_mask, stride_zero_row, ZERO_PLANE_WORDS, N2, HAS_Q1, INT_ZERO)
    return (scale * x_scale) * (codes_q - zero * x_sum)


# fmt: off
@triton.jit
def _moe_gemv_dp4a_kernel(
    xp2_ptr, xp1_ptr, x_scale_ptr, x_sum_ptr, out_ptr, pair_expert_ptr, local_index_ptr, routing_weight_ptr,
    q2_ptr, q1_ptr, scale_ptr, zero_ptr,
    NUM_EXPERTS, K, N, X_ROWS_PER_PAIR_DIV, UP_OFFSET,
    stride_xp2, stride_xp1, stride_x_block, stride_out, stride_q2_expert, stride_q2_plane, stride_q2_row,
    stride_q1_expert, stride_q1_row, stride_meta_expert, stride_meta_row, stride_zero_expert, stride_zero_row,
    ZERO_PLANE_WORDS,
    GROUP: tl.constexpr, N2: tl.constexpr, HAS_Q1: tl.constexpr, INT_ZERO: tl.constexpr, DIGITS: tl.constexpr,
    GATE_AND_UP: tl.constexpr,
    HAS_ROUTING_WEIGHT: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
    USE_ASM: tl.constexpr,
):
    # fmt: on
    """Decode GEMV on quantized activations: one program per (pair, N tile, K split), float32
    partial sums stored (one split) or added atomically. ``GATE_AND_UP``: the program also computes
    the up columns n + UP_OFFSET (the SwiGLU epilogue runs after all splits are summed)."""
    pair = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    local = _pair_slot(pair_expert_ptr, local_index_ptr, pair, NUM_EXPERTS)
    if local < 0:
        return
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    row = (pair // X_ROWS_PER_PAIR_DIV).to(tl.int64)
    xp2_row = xp2_ptr + row * stride_xp2
    xp1_row = xp1_ptr + row * stride_xp1
    q2_e, q1_e, scale_e, zero_e = _expert_tensors(
        q2_ptr, q1_ptr, scale_ptr, zero_ptr, local, stride_q2_expert, stride_q1_expert, stride_meta_expert,
        stride_zero_expert,
    )
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
        block = row * stride_x_block + k0 // BLOCK_K
        x_scale = tl.load(x_scale_ptr + block)
        x_sum = tl.load(x_sum_ptr + block)
        acc += _block_dot_dp4a(
            q2_e, q1_e, scale_e, zero_e, k0, offs_n, n_mask, xp2_row, xp1_row, x_scale, x_sum, stride_q2_plane,
            stride_q2_row, stride_q1_row, stride_meta_row, stride_zero_row, ZERO_PLANE_WORDS, GROUP, N2, HAS_Q1,
            INT_ZERO, DIGITS, BLOCK_K, USE_ASM,
        )
        if GATE_AND_UP:
            acc_up += _block_dot_dp4a(
                q2_e, q1_e, scale_e, zero_e, k0, offs_n + UP_OFFSET, n_mask, xp2_row, xp1_row, x_scale, x_sum,
                stride_q2_plane, stride_q2_row, stride_q1_row, stride_meta_row, stride_zero_row, ZERO_PLANE_WORDS,
                GROUP, N2, HAS_Q1, INT_ZERO, DIGITS, BLOCK_K, USE_ASM,
            )
    if HAS_ROUTING_WEIGHT:
        acc *= tl.load(routing_weight_ptr + pair).to(tl.float32)
    out = out_ptr + pair.to(tl.int64) * stride_out + offs_n
    if SPLIT_K == 1:
        tl.store(out, acc, mask=n_mask)
        if GATE_AND_UP:
            tl.store(out + UP_OFFSET, acc_up, mask=n_mask)
    else:
        tl.atomic_add(out, acc, mask=n_mask, sem="relaxed")  # partial sums need no ordering
        if GATE_AND_UP:
            tl.atomic_add(out + UP_OFFSET, acc_up, mask=n_mask, sem="relaxed")


@triton.jit
def _pack_bytes(q, WORDS: tl.constexpr, POSITIONS: tl.constexpr):
    """int32 [WORDS, POSITIONS] from q [WORDS * 4 * POSITIONS]: byte b of entry (w, j) is q at
    w * 4 * POSITIONS + POSITIONS * b + j (the sum of disjoint byte fields is their OR)."""
    fields = (tl.reshape(q, (WORDS, 4, POSITIONS)) & 0xFF) << (8 * tl.arange(0, 4))[None, :, None]
    return tl.sum(fields, axis=1)


@triton.jit
def _moe_quantize_activations_kernel(x_ptr, xp2_ptr, xp1_ptr, x_scale_ptr, x_sum_ptr, stride_x, stride_xp2,
                                     stride_xp1, stride_blocks, DIGITS: tl.constexpr,
                                     BLOCK_K: tl.constexpr):  # fmt: skip
    """One (row, K step) of ``activation_quant.quantize_activations`` in one launch: the same scale,
    rounding (half to even) and packing."""
    row = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    x = tl.load(x_ptr + row * stride_x + block * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.float32)
    largest = tl.max(tl.abs(x), axis=0)
    limit: tl.constexpr = 127.0 if DIGITS == 1 else 16256.0
    scale = tl.where(largest > 0, tl.div_rn(largest, limit), 1.0)
    q = ((tl.div_rn(x, scale) + 12582912.0) - 12582912.0).to(tl.int32)  # 1.5 * 2^23: rounds half to even
    tl.store(x_scale_ptr + row * stride_blocks + block, scale)
    tl.store(x_sum_ptr + row * stride_blocks + block, tl.sum(q, axis=0).to(tl.float32))
    WORDS2: tl.constexpr = BLOCK_K // 16
    WORDS1: tl.constexpr = BLOCK_K // 32
    words2 = block * WORDS2 + tl.arange(0, WORDS2)
    words1 = block * WORDS1 + tl.arange(0, WORDS1)
    for digit in tl.static_range(DIGITS):
        if DIGITS == 1:
            digit_q = q
        elif digit == 0:  # q = 128 hi + lo, lo in [-64, 63]
            digit_q = (q + 64) >> 7
        else:
            digit_q = q - 128 * ((q + 64) >> 7)
        xp2 = xp2_ptr + row * stride_xp2 + words2[:, None] * (4 * DIGITS) + digit * 4 + tl.arange(0, 4)[None, :]
        tl.store(xp2, _pack_bytes(digit_q, WORDS2, 4))
        xp1 = xp1_ptr + row * stride_xp1 + words1[:, None] * (8 * DIGITS) + digit * 8 + tl.arange(0, 8)[None, :]
        tl.store(xp1, _pack_bytes(digit_q, WORDS1, 8))
