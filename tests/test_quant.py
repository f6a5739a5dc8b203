import pytest
import torch

from optimum_moeq.kernels import dequantize_packed
from optimum_moeq.quant import dequantize, pack_projection, quantize_rtn


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_rtn_error_is_at_most_half_a_step(bits):
    weight = torch.randn(2, 16, 128, dtype=torch.float64)
    q = quantize_rtn(weight, bits, group_size=32)
    assert q.codes.min() >= 0 and q.codes.max() <= 2**bits - 1
    assert q.scale.dtype == q.zero.dtype == torch.float16
    assert q.scale.shape == q.zero.shape == (2, 16, 4)
    # independent float64 dequantization
    s = q.scale.double().repeat_interleave(32, dim=-1)
    z = q.zero.double().repeat_interleave(32, dim=-1)
    restored = (q.codes.double() - z) * s
    assert torch.allclose(dequantize(q.codes, q.scale, q.zero).double(), restored, atol=1e-6)
    # every weight within half a step, plus the float16 rounding of the metadata
    assert ((restored - weight).abs() <= s * 0.5 + 2e-3 * weight.abs().amax()).all()


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_rtn_integer_zeros_are_codes_and_still_within_half_a_step(bits):
    """The zero rounded to the grid shifts the grid by under half a step: a weight then lies within
    a step of its code (half a step, plus the shift) and the ends of the range stay reachable."""
    weight = torch.randn(2, 16, 128, dtype=torch.float64)
    q = quantize_rtn(weight, bits, group_size=32, integer_zero=True)
    assert torch.equal(q.zero, q.zero.round()) and q.zero.min() >= 0 and q.zero.max() <= 2**bits - 1
    s = q.scale.double().repeat_interleave(32, dim=-1)
    restored = (q.codes.double() - q.zero.double().repeat_interleave(32, dim=-1)) * s
    assert ((restored - weight).abs() <= s + 2e-3 * weight.abs().amax()).all()
    packed = pack_projection(q, integer_zeros=True)
    assert packed.zero.dtype == torch.int32
    assert torch.allclose(dequantize_packed(packed).double(), restored, atol=1e-6)


def test_packing_refuses_zeros_that_are_not_codes():
    q = quantize_rtn(torch.randn(4, 64), 2, group_size=32)  # float zeros
    with pytest.raises(ValueError, match=r"integer_zeros: the quantizer gave zero points that are not integers"):
        pack_projection(q, integer_zeros=True)


def test_rtn_is_exact_on_weights_already_on_the_grid():
    codes = torch.randint(0, 8, (4, 64))
    codes[:, ::32] = 0
    codes[:, 1::32] = 7  # every group spans the full 3-bit range
    weight = (codes.float() - 3.0) * 0.25  # scale 0.25, zero 3: exact in float16
    q = quantize_rtn(weight, 3, group_size=32)
    assert torch.equal(q.codes, codes.int())
    assert torch.equal(dequantize(q.codes, q.scale, q.zero), weight)


@pytest.mark.parametrize("method", ["rtn", "hqq"])
def test_near_constant_groups_far_from_zero_stay_finite_and_close(method):
    """A group of (nearly) equal values: min-max alone would give a zero point of about
    value / 2**-24, past float16's range (inf), and NaN outputs."""
    from optimum_moeq.quant import quantize_weight

    weight = torch.randn(3, 64, dtype=torch.float64) * 0.02
    weight[0, :32] = 0.01  # constant, positive
    weight[1, 32:] = -0.5 + 1e-7 * torch.arange(32)  # nearly constant, negative
    weight[2, :32] = 0.0
    q = quantize_weight(weight.float(), 2, 32, method)
    assert torch.isfinite(q.scale.float()).all() and torch.isfinite(q.zero.float()).all()
    restored = dequantize(q.codes, q.scale, q.zero).double()
    assert ((restored - weight).abs()[0, :32] < 1e-4).all()
    assert ((restored - weight).abs()[1, 32:] < 1e-3).all()
    assert (restored[2, :32] == 0).all()


def test_group_size_must_divide_the_input_dimension():
    with pytest.raises(ValueError, match="group_size=48 does not divide the input dimension 64"):
        quantize_rtn(torch.randn(4, 64), 2, group_size=48)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_packed_layout_dequantizes_to_the_same_weights(bits):
    weight = torch.randn(3, 48, 64)
    q = quantize_rtn(weight, bits, group_size=16)
    packed = pack_projection(q)
    assert packed.scale.shape == (3, 4, 48)  # [E, K/G, N]: N contiguous for the kernels
    assert torch.equal(dequantize_packed(packed), dequantize(q.codes, q.scale, q.zero))
    assert packed.nbytes == 3 * 48 * 64 * bits // 8 + 2 * 2 * 3 * 48 * 4
