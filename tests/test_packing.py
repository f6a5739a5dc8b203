import pytest
import torch

from optimum_moeq.quant.packing import (
    pack_codes,
    pack_zero_codes,
    packed_shapes,
    unpack_codes,
    unpack_zero_codes,
    zero_words,
)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("lead", [(), (3,)])
def test_pack_unpack_round_trip_is_exact(bits, lead):
    generator = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (*lead, 64, 24), generator=generator, dtype=torch.int32)
    q2, q1 = pack_codes(codes, bits)
    assert torch.equal(unpack_codes(q2, q1, bits), codes)
    stored = [t for t in (q2, q1) if t is not None]
    assert all(t.dtype == torch.int32 for t in stored)
    assert {name: tuple(t.shape) for name, t in zip(("q2", "q1"), (q2, q1)) if t is not None} == packed_shapes(
        bits, 64, 24, lead
    )
    # exactly `bits` bits per code, no padding
    assert sum(t.numel() * 32 for t in stored) == codes.numel() * bits


def test_two_bit_word_layout_matches_hand_computation():
    values = [3, 0, 1, 2, 2, 1, 0, 3, 3, 3, 1, 1, 0, 2, 2, 0]  # 16 rows of K, one column
    codes = torch.tensor(values, dtype=torch.int32)[:, None]
    q2, q1 = pack_codes(codes, 2)
    expected = sum(v << (2 * j) for j, v in enumerate(values))  # value j in bits 2j, 2j+1
    assert q1 is None
    assert q2.shape == (1, 1, 1)
    assert q2.item() & 0xFFFFFFFF == expected


def test_three_bit_top_bit_goes_to_the_one_bit_plane():
    codes = torch.zeros(32, 1, dtype=torch.int32)
    codes[5] = 7  # 0b111: low two bits in the 2-bit plane, top bit in the 1-bit plane
    q2, q1 = pack_codes(codes, 3)
    assert q2[0, 0, 0].item() == 3 << 10 and q2[0, 1, 0].item() == 0
    assert q1[0, 0].item() == 1 << 5


def test_input_dimension_must_pack_whole_words():
    message = r"codes has input dimension 48, which bit-widths \[3\] cannot pack: it must be a multiple of 32 \(odd"
    with pytest.raises(ValueError, match=message):
        pack_codes(torch.zeros(48, 4, dtype=torch.int32), 3)
    assert pack_codes(torch.zeros(48, 4, dtype=torch.int32), 2)[1] is None  # even widths: multiples of 16


def test_a_model_whose_width_odd_bits_cannot_pack_is_refused_before_any_read(tmp_path, monkeypatch):
    from conftest import tiny_mixtral_config
    from transformers import AutoModelForCausalLM, MixtralForCausalLM

    import optimum_moeq.quantizer as quantizer
    from optimum_moeq import RouterNormConfig

    MixtralForCausalLM(tiny_mixtral_config(hidden_size=48)).save_pretrained(tmp_path)
    monkeypatch.setattr(quantizer, "allocate_from_files", lambda *a, **k: pytest.fail("the checkpoint was read"))
    with pytest.raises(ValueError, match=r"\(input projection\) has input dimension 48, which bit-widths \[2, 3\]"):
        AutoModelForCausalLM.from_pretrained(
            tmp_path, quantization_config=RouterNormConfig(method="rtn", group_size=16)
        )
    monkeypatch.undo()
    even = AutoModelForCausalLM.from_pretrained(  # even widths pack 48 (a multiple of 16)
        tmp_path, quantization_config=RouterNormConfig(method="rtn", avg_bits=3, bit_levels=(2, 4), group_size=16)
    )
    assert even.config.quantization_config.allocation["model.layers.0.mlp.experts"].count(4) == 4
    given = {f"model.layers.{i}.mlp.experts": [2] * 8 for i in range(2)}  # levels (2, 3), but only 2 bits used
    model = AutoModelForCausalLM.from_pretrained(
        tmp_path, quantization_config=RouterNormConfig(method="rtn", group_size=16, allocation=given)
    )
    assert model.config.quantization_config.allocation == given


@pytest.mark.parametrize("bits", [0, 9, 2.5])
def test_unsupported_bits_are_refused(bits):
    with pytest.raises(ValueError, match=r"bits=.* is not supported: allowed are integers 1 to 8"):
        pack_codes(torch.zeros(32, 4, dtype=torch.int32), bits)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [16, 24, 32, 40])  # whole words and padded last words
def test_integer_zeros_pack_along_n_at_exactly_b_bits_a_group(bits, n):
    generator = torch.Generator().manual_seed(bits * n)
    zero = torch.randint(0, 2**bits, (3, 2, n), generator=generator, dtype=torch.int32)  # [E, K/G, N]
    words = pack_zero_codes(zero, bits)
    assert words.dtype == torch.int32 and words.shape == (3, 2, zero_words(bits, n))
    assert torch.equal(unpack_zero_codes(words, bits, n), zero)
    # independent reading: 2-bit plane i's word w holds outputs 16 w .. 16 w + 15 in bits 2j, 2j+1;
    # the 1-bit plane's word w outputs 32 w .. 32 w + 31 in bit j
    w2 = -(-n // 16)
    for out in range(n):
        value = 0
        for i in range(bits // 2):
            word = words[1, 0, i * w2 + out // 16].item() & 0xFFFFFFFF
            value |= ((word >> (2 * (out % 16))) & 3) << (2 * i)
        if bits % 2:
            word = words[1, 0, bits // 2 * w2 + out // 32].item() & 0xFFFFFFFF
            value |= ((word >> (out % 32)) & 1) << (bits - 1)
        assert value == zero[1, 0, out].item()
    if n % 32 == 0:
        assert words[0].numel() * 32 == zero[0].numel() * bits  # no padding: b bits per zero


def test_integer_zeros_refuse_a_row_of_the_wrong_width():
    with pytest.raises(ValueError, match=r"integer zeros of 3 bits for 40 outputs take 5 words per group, got 4"):
        unpack_zero_codes(torch.zeros(1, 4, dtype=torch.int32), 3, 40)
