import pytest
import torch

from optimum_moeq.quant import dequantize, quantize_hqq, quantize_rtn


def _mse(weight, q):
    return (dequantize(q.codes, q.scale, q.zero).double() - weight.double()).pow(2).mean().item()


def _weights(kind, generator):
    shape = (4, 64, 256)
    if kind == "gaussian":
        return torch.randn(shape, generator=generator) * 0.02
    # heavy tails, as trained weights have: Student-t with 4 degrees of freedom
    normal = torch.randn(shape, generator=generator)
    chi2 = torch.randn((*shape, 4), generator=generator).pow(2).sum(-1)
    return normal / (chi2 / 4).sqrt() * 0.02


@pytest.mark.parametrize("kind", ["gaussian", "student_t"])
@pytest.mark.parametrize("group_size", [64, 128])
def test_hqq_error_at_two_bits_is_at_least_20_percent_below_rtn(kind, group_size):
    weight = _weights(kind, torch.Generator().manual_seed(0))
    rtn, hqq = _mse(weight, quantize_rtn(weight, 2, group_size)), _mse(weight, quantize_hqq(weight, 2, group_size))
    assert hqq < 0.8 * rtn


@pytest.mark.parametrize("bits", [1, 3, 4, 8])
def test_hqq_is_never_worse_than_rtn_group_by_group(bits):
    weight = _weights("student_t", torch.Generator().manual_seed(bits))
    rtn, hqq = quantize_rtn(weight, bits, 64), quantize_hqq(weight, bits, 64)

    def group_error(q):
        error = (dequantize(q.codes, q.scale, q.zero) - weight).pow(2)
        return error.reshape(*error.shape[:-1], -1, 64).sum(-1)

    # float16 metadata rounding allows a hair of slack
    assert (group_error(hqq) <= group_error(rtn) * (1 + 1e-3) + 1e-12).all()
    assert hqq.scale.dtype == hqq.zero.dtype == torch.float16


def test_hqq_is_exact_on_weights_already_on_the_grid():
    codes = torch.randint(0, 8, (4, 64))
    codes[:, ::32] = 0
    codes[:, 1::32] = 7
    weight = (codes.float() - 3.0) * 0.25
    q = quantize_hqq(weight, 3, group_size=32)
    assert torch.equal(dequantize(q.codes, q.scale, q.zero), weight)


def test_robust_lp_step_keeps_the_error_from_rising():
    weight = _weights("student_t", torch.Generator().manual_seed(3))
    plain = _mse(weight, quantize_hqq(weight, 2, 64))
    robust = _mse(weight, quantize_hqq(weight, 2, 64, lp_norm=0.7))
    assert robust <= plain * (1 + 1e-3)
