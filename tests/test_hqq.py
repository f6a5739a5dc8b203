import importlib.util

import pytest
import torch

from optimum_moeq.quant import dequantize, quantize_hqq


def _weights(kind, generator, shape=(4, 64, 256)):
    if kind == "gaussian":
        return torch.randn(shape, generator=generator) * 0.02
    # heavy tails, as trained weights have: Student-t with 4 degrees of freedom
    normal = torch.randn(shape, generator=generator)
    chi2 = torch.randn((*shape, 4), generator=generator).pow(2).sum(-1)
    return normal / (chi2 / 4).sqrt() * 0.02


def _published_hqq(weight: torch.Tensor, bits: int, group_size: int):
    """HQQ as its paper and library state it, for one 2-D weight, in float64: min-max grid, then
    zero <- mean(q - (w - shrink_lp(w - w_r)) / s), stopping when the mean |w - w_r| stops falling.
    Returns (scale, zero) [N, K/G]."""
    qmax = 2**bits - 1
    w = weight.double().reshape(weight.shape[0], -1, group_size)
    lo, hi = w.min(dim=-1, keepdim=True).values, w.max(dim=-1, keepdim=True).values
    inverse = (qmax / (hi - lo)).clamp(max=2e4)
    zero = -lo * inverse
    best = float("inf")
    for _ in range(20):
        q = (w * inverse + zero).round().clamp(0, qmax)
        residual = w - (q - zero) / inverse
        error = residual.abs().mean().item()
        outliers = torch.sign(residual) * torch.relu(residual.abs() - residual.abs().pow(0.7 - 1) / 10.0)
        zero = (q - (w - outliers) * inverse).mean(dim=-1, keepdim=True)
        if error >= best:
            break
        best = error
    return (1 / inverse).squeeze(-1), zero.squeeze(-1)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("group_size", [64, 128])
def test_hqq_is_the_published_algorithm(bits, group_size):
    """Scale and zero of each group as the float64 statement of HQQ gives them, to float16's
    rounding of the stored metadata (zeros up to 2^bits: a half-ulp of 2^-11 relative)."""
    weight = _weights("student_t", torch.Generator().manual_seed(bits), (96, 512))
    q = quantize_hqq(weight, bits, group_size)
    scale, zero = _published_hqq(weight, bits, group_size)
    assert q.scale.dtype == q.zero.dtype == torch.float16 and q.scale.shape == (96, 512 // group_size)
    torch.testing.assert_close(q.scale.double(), scale, rtol=2**-10, atol=0)
    torch.testing.assert_close(q.zero.double(), zero, rtol=0, atol=2.0**bits * 2**-11)


@pytest.mark.skipif(importlib.util.find_spec("hqq") is None, reason="the hqq library is not installed")
@pytest.mark.parametrize("bits", [2, 3])
def test_hqq_matches_the_hqq_library(bits):
    from hqq.core.quantize import Quantizer

    weight = _weights("student_t", torch.Generator().manual_seed(7), (128, 512))
    codes, meta = Quantizer.quantize(weight, nbits=bits, group_size=64, optimize=True, axis=1, bitpack=False,
                                     device="cpu")  # fmt: skip
    q = quantize_hqq(weight, bits, 64)
    # the same codes (rounded on the solver's float32 grid, as the library does), the same metadata
    # once stored in float16
    assert torch.equal(codes.reshape(q.codes.shape).int(), q.codes)
    assert torch.equal(meta["scale"].reshape(q.scale.shape).half(), q.scale)
    assert torch.equal(meta["zero"].reshape(q.zero.shape).half(), q.zero)


@pytest.mark.parametrize("bits", [1, 2, 3])
def test_each_expert_of_a_stack_is_its_own_weight(bits):
    """Early stopping is per weight: stacked experts give what each gives alone."""
    weight = _weights("gaussian", torch.Generator().manual_seed(bits))
    weight[1] *= 5.0  # a different error scale, so the experts stop at different iterations
    stacked = quantize_hqq(weight, bits, 64)
    for e in range(weight.shape[0]):
        alone = quantize_hqq(weight[e], bits, 64)
        assert torch.equal(stacked.codes[e], alone.codes) and torch.equal(stacked.zero[e], alone.zero)


@pytest.mark.parametrize("kind", ["gaussian", "student_t"])
@pytest.mark.parametrize("bits", [2, 3])
def test_hqq_lowers_the_absolute_error_of_the_min_max_grid(kind, bits):
    """What the solver stops on: the weights' mean absolute error falls below that of the plain
    min-max grid it starts from (by 4-9% on these weights)."""
    weight = _weights(kind, torch.Generator().manual_seed(0))
    qmax = 2**bits - 1
    w = weight.reshape(*weight.shape[:-1], -1, 64)
    lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    min_max = ((w - lo) / (hi - lo) * qmax).round() * (hi - lo) / qmax + lo
    q = quantize_hqq(weight, bits, 64)
    hqq_error = (dequantize(q.codes, q.scale, q.zero) - weight).abs().mean()
    assert hqq_error < 0.98 * (min_max.reshape(weight.shape) - weight).abs().mean()


def test_hqq_is_exact_on_weights_already_on_the_grid():
    codes = torch.randint(0, 8, (4, 64))
    codes[:, ::32] = 0
    codes[:, 1::32] = 7
    weight = (codes.float() - 3.0) * 0.25
    q = quantize_hqq(weight, 3, group_size=32)
    assert torch.equal(dequantize(q.codes, q.scale, q.zero), weight)
