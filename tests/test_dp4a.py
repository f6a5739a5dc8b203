"""The integer-dot-product decode kernel (dp4a): activations quantized per K step, codes times
activations summed exactly in int32. Checked against float64 references built from the stored codes
and from the quantized activations unpacked independently; on a GPU, the PTX instruction against
the plain-Triton integers, bit for bit."""

import pytest
import torch

pytest.importorskip("triton")

from optimum_moeq.kernels.activation_quant import quantize_activations  # noqa: E402
from optimum_moeq.kernels.grouped import dp4a_applies, mixed_bit_projection  # noqa: E402
from optimum_moeq.kernels.reference import dequantize_packed  # noqa: E402
from optimum_moeq.kernels.tuning import KernelTuning, kernel_tuning  # noqa: E402
from optimum_moeq.nn import MixedBitExperts  # noqa: E402
from optimum_moeq.quant.synthetic import random_packed_projection  # noqa: E402


def _experts(bits, hidden, intermediate, group_size, device="cpu", seed=0, integer_zeros=False):
    generator = torch.Generator().manual_seed(seed)
    module = MixedBitExperts(bits, hidden, intermediate, group_size, integer_zeros=integer_zeros)
    for proj, (n, k) in module.layout.projections.items():
        for b, members in module.layout.members.items():
            packed = random_packed_projection(len(members), n, k, b, group_size, generator=generator,
                                              integer_zeros=integer_zeros)  # fmt: skip
            module.store_packed(proj, packed)
    return module.to(device)


def _unpacked(packed: torch.Tensor, word_rows: int, positions: int, digits: int) -> torch.Tensor:
    """Independent unpacking of ``xp2`` / ``xp1``: byte b of entry d * positions + j is row
    word * word_rows + positions * b + j of digit d; returns int64 [digits, R, K]."""
    rows, words, _ = packed.shape
    out = torch.zeros(digits, rows, words * word_rows, dtype=torch.int64)
    for d in range(digits):
        for j in range(positions):
            entry = packed[:, :, d * positions + j].long()
            for b in range(4):
                byte = (entry >> (8 * b)) & 0xFF
                out[d, :, torch.arange(words) * word_rows + positions * b + j] = byte - 256 * (byte >= 128).long()
    return out


@pytest.mark.parametrize("digits", [1, 2])
def test_activations_are_packed_as_the_kernel_reads_them(digits):
    generator = torch.Generator().manual_seed(digits)
    x = torch.randn(3, 256, generator=generator) * torch.rand(256, generator=generator) * 4
    x[1, :64] = 0.0  # an all-zero block
    acts = quantize_activations(x.to(torch.bfloat16), 64, digits)
    assert acts.xp2.dtype == acts.xp1.dtype == torch.int32 and acts.x_scale.dtype == acts.x_sum.dtype == torch.float32
    assert acts.xp2.shape == (3, 16, 4 * digits) and acts.xp1.shape == (3, 8, 8 * digits)
    hi_lo = _unpacked(acts.xp2, 16, 4, digits)
    assert torch.equal(hi_lo, _unpacked(acts.xp1, 32, 8, digits))  # both packings hold the same values
    q = hi_lo[0] if digits == 1 else 128 * hi_lo[0] + hi_lo[1]
    if digits == 2:
        assert hi_lo[0].abs().max() <= 127 and hi_lo[1].min() >= -64 and hi_lo[1].max() <= 63
    limit = 127 if digits == 1 else 127 * 128
    scale = acts.x_scale.double().repeat_interleave(64, dim=1)
    x64 = x.to(torch.bfloat16).double()
    assert q.abs().max() <= limit
    ratio = x64 / scale
    nearest = torch.round(ratio).long()
    tie = ((ratio - ratio.floor()) - 0.5).abs() < 1e-5  # float32 division may round a near-tie either way
    assert torch.equal(q[~tie], nearest[~tie]) and ((q - ratio).abs()[tie] < 0.5 + 1e-5).all()
    assert ((x64 - scale * q).abs() <= scale / 2 + 1e-12).all()
    assert torch.equal(acts.x_sum.long(), q.view(3, 4, 64).sum(-1))
    assert (acts.x_scale[1, 0] == 1.0) and not q[1, :64].any()


def test_bad_activation_digits_and_blocks_name_what_is_allowed():
    with pytest.raises(ValueError, match=r"digits=3 is not supported: allowed are 1 \(int8\) and 2"):
        quantize_activations(torch.randn(1, 64), 32, 3)
    with pytest.raises(ValueError, match=r"block_k=16 must be a multiple of 32 dividing K=64"):
        quantize_activations(torch.randn(1, 64), 16)
    with pytest.raises(ValueError, match=r"gemv_kernel='int4' is not supported: allowed are \('dp4a', 'float'\)"):
        KernelTuning(gemv_kernel="int4")
    with pytest.raises(ValueError, match=r"activation_digits=3 is not supported"):
        KernelTuning(activation_digits=3)


def _dequantized(acts, block_k: int, digits: int) -> torch.Tensor:
    """float64 [R, K]: scale x q, q read back from the packed words by ``_unpacked``."""
    hi_lo = _unpacked(acts.xp2, 16, 4, digits)
    q = hi_lo[0] if digits == 1 else 128 * hi_lo[0] + hi_lo[1]
    return acts.x_scale.double().repeat_interleave(block_k, dim=1) * q


def _reference(module, proj, x_deq, pair_expert, rows_per_pair, routing_weights, swiglu, n_out):
    """float64 rows per pair from the stored codes and the dequantized quantized activations."""
    out = []
    for pair, expert in enumerate(pair_expert.tolist()):
        if not 0 <= expert < module.layout.num_experts:
            out.append(torch.zeros(n_out, dtype=torch.float64))
            continue
        w = dequantize_packed(module.expert_projection(proj, expert)).double()
        y = w @ x_deq[pair // rows_per_pair]
        if swiglu:
            y = torch.nn.functional.silu(y[:n_out]) * y[n_out:]
        out.append(y * (routing_weights[pair].double() if routing_weights is not None else 1.0))
    return torch.stack(out)


@pytest.mark.parametrize(
    "bits, group_size, digits, integer_zeros",
    [
        ([1, 2, 3, 4], 32, 1, False),
        ([5, 6, 7, 8], 64, 2, False),
        ([3, 3, 2, 2], 128, 2, False),
        ([2, 2, 1, 2], 256, 1, False),
        ([1, 2, 3, 4], 32, 1, True),
        ([5, 6, 7, 8], 64, 2, True),
    ],
)  # every width and both digit counts; one K step per group, or two per group of 256; both zero formats
def test_dp4a_decode_sums_codes_times_quantized_activations_exactly(bits, group_size, digits, integer_zeros):
    hidden, intermediate = 256, max(group_size, 128)
    module = _experts(bits, hidden, intermediate, group_size, seed=sum(bits), integer_zeros=integer_zeros)
    generator = torch.Generator().manual_seed(group_size + digits)
    x = torch.randn(2, hidden, generator=generator).to(torch.bfloat16)
    pair_expert = torch.tensor([3, 1, 0, 2], dtype=torch.int32)  # two tokens, top-2
    weights = torch.rand(4, generator=generator)
    block_k = min(group_size, 128)
    with kernel_tuning(gemv_kernel="dp4a", activation_digits=digits):
        assert dp4a_applies(x.dtype, group_size)
        layout, tensors = module.layout, module._tensors()
        for proj, swiglu, rows_per_pair, routing, n_out in (
            ("gate_up_proj", True, 2, None, intermediate),
            ("down_proj", False, 1, weights, hidden),
        ):
            inputs = x if proj == "gate_up_proj" else torch.randn(4, intermediate, generator=generator).bfloat16()
            x_deq = _dequantized(quantize_activations(inputs, block_k, digits), block_k, digits)
            out = mixed_bit_projection(
                inputs, pair_expert, layout, layout.kernel_planes(tensors, proj), n_out=n_out,
                out_dtype=torch.float32, x_rows_per_pair_div=rows_per_pair, fuse_swiglu=swiglu,
                routing_weights=routing,
            )  # fmt: skip
            expected = _reference(module, proj, x_deq, pair_expert, rows_per_pair, routing, swiglu, n_out)
            assert out.shape == expected.shape and out.dtype == torch.float32
            assert ((out.double() - expected).norm() / expected.norm()).item() < 2e-6


@pytest.mark.parametrize("digits, tolerance", [(1, 2e-2), (2, 4e-3)])
def test_dp4a_layer_against_the_exact_reference_with_dropped_and_foreign_ids(digits, tolerance):
    """Whole layer in bf16: int8 activations cost about bf16's own rounding, two digits far less."""
    module = _experts([2, 3, 3, 2, 4, 1, 3, 2], 128, 256, 64)
    generator = torch.Generator().manual_seed(7)
    index = torch.randint(0, 8, (5, 2), generator=generator)
    index[1, 1], index[3, 0] = -1, 8
    weights = torch.rand(5, 2, generator=generator)
    x = torch.randn(5, 128, generator=generator)
    inside = (index >= 0) & (index < 8)
    module.kernel = "torch"
    expected = module(x.bfloat16().float(), torch.where(inside, index, 0), torch.where(inside, weights, 0.0))
    module.kernel = "triton"
    with kernel_tuning(gemv_kernel="dp4a", activation_digits=digits):
        out = module(x.bfloat16(), index, weights)
    assert out.dtype == torch.bfloat16
    assert ((out.float() - expected).norm() / expected.norm()).item() < tolerance


def test_dp4a_runs_on_request_for_16_bit_activations_only():
    assert not dp4a_applies(torch.bfloat16, 128)  # the default decode kernel is the float one
    with kernel_tuning(gemv_kernel="dp4a"):
        assert dp4a_applies(torch.bfloat16, 128) and dp4a_applies(torch.float16, 64)
        assert not dp4a_applies(torch.float32, 128)  # float32 keeps the exact float kernel
        assert not dp4a_applies(torch.bfloat16, 16)  # a K step of 16 rows holds half a 1-bit word


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the PTX dp4a runs on a GPU")
@pytest.mark.parametrize("digits", [1, 2])
def test_dp4a_instruction_and_plain_triton_agree_bit_for_bit_on_gpu(digits):
    module = _experts([2, 3, 4, 1, 8, 3, 2, 5], 4096, 1024, 128, device="cuda")
    generator = torch.Generator().manual_seed(digits)
    index = torch.randint(0, 8, (4, 2), generator=generator).cuda()
    weights, x = torch.rand(4, 2, generator=generator).cuda(), torch.randn(4, 4096, generator=generator).cuda()
    module.kernel = "triton"
    results = []
    for asm in (True, False):
        no_split = dict(target_programs=1)  # one program per sum: no atomics, the same float order
        with kernel_tuning(gemv_kernel="dp4a", activation_digits=digits, dp4a_asm=asm, **no_split):
            results.append(module(x.bfloat16(), index, weights))
    assert torch.equal(results[0], results[1])


@pytest.mark.parametrize("digits", [1, 2])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_activation_quantization_kernel_equals_the_torch_reference(digits, dtype):
    from optimum_moeq.kernels.grouped import _quantized_activations

    generator = torch.Generator().manual_seed(digits)
    x = (torch.randn(3, 256, generator=generator) * torch.rand(256, generator=generator) * 3).to(dtype)
    x[0, 128:] = 0.0  # an all-zero block
    x[1, 5] = 0.5 * x[1, :64].abs().max() / 127 * 2  # values near ties of the grid
    for block_k in (32, 128):
        expected, got = quantize_activations(x, block_k, digits), _quantized_activations(x, block_k, digits)
        for field in expected._fields:
            assert torch.equal(getattr(got, field), getattr(expected, field)), field
