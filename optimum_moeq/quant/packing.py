"""Bit-plane packing: a b-bit code costs exactly b bits.

Layout (format version 1). A projection's codes are held transposed, ``[..., K, N]``
(K = input features, N = output features), so that N is contiguous for the GPU kernels.
A b-bit code ``c`` is split into ``b // 2`` two-bit planes and, for odd ``b``, one one-bit
plane holding the top bit::

    c = p2[0] | p2[1] << 2 | ... | p2[b//2 - 1] << 2*(b//2 - 1) | p1 << 2*(b//2)

A two-bit plane packs 16 consecutive K rows into one int32 (``[..., K/16, N]``), value ``j`` of
a word in bits ``2j, 2j+1``; the one-bit plane packs 32 rows (``[..., K/32, N]``), value ``j``
in bit ``j``. Two-bit planes are stacked on a new axis: ``q2`` is ``[..., b//2, K/16, N]``.
One decode path serves every width, with power-of-two strides and no value crossing a word.

Integer zero points (format version 2) are b-bit codes too, packed the same way but along N, one
row of words per group: ``zero`` int32 ``[..., K/G, Z]`` holds the two-bit planes' words
(``ceil(N/16)`` each, value ``j`` of word ``w`` is output ``16 w + j``) and then, for odd widths,
the one-bit plane's ``ceil(N/32)`` words; the last word of a plane is padded with zero bits.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

MIN_BITS, MAX_BITS = 1, 8
_VALUES_PER_WORD = {2: 16, 1: 32}


def check_bits(bits: int) -> None:
    if not isinstance(bits, int) or isinstance(bits, bool) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits={bits!r} is not supported: allowed are integers {MIN_BITS} to {MAX_BITS}.")


def num_two_bit_planes(bits: int) -> int:
    return bits // 2


def has_one_bit_plane(bits: int) -> bool:
    return bits % 2 == 1


def required_k_multiple(bits: int) -> int:
    """The input dimension must be a multiple of this for ``bits`` to pack without padding."""
    return 32 if has_one_bit_plane(bits) else 16


def check_packable(k: int, bit_widths: Sequence[int], name: str = "weight") -> None:
    """``k`` (an input dimension) packs at every width in ``bit_widths``, or an error saying what would."""
    multiple = max(required_k_multiple(b) for b in bit_widths)
    if k % multiple:
        hint = " (odd widths pack a 1-bit plane, 32 codes per word; even widths need a multiple of 16)"
        raise ValueError(
            f"{name} has input dimension {k}, which bit-widths {sorted(set(bit_widths))} cannot pack: it must be "
            f"a multiple of {multiple}{hint if multiple == 32 and k % 16 == 0 else ''}."
        )


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    # Words are built in int64 as unsigned 32-bit values; reinterpret the top bit as the sign.
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _pack_plane(codes: torch.Tensor, shift: int, width: int) -> torch.Tensor:
    """Bits ``shift .. shift + width - 1`` of ``codes`` [..., K, N] -> int32 [..., K/per_word, N].

    Built one value position of the word at a time, so that the temporaries are word-sized: a
    whole-size int64 copy of the codes would cost 16 bytes per weight (7.5 GB for the gate_up of
    four Mixtral-8x7B experts)."""
    per_word = _VALUES_PER_WORD[width]
    *lead, k, n = codes.shape
    rows = codes.reshape(*lead, k // per_word, per_word, n)  # a view, also of a transposed tensor
    words = torch.zeros((*lead, k // per_word, n), dtype=torch.int64, device=codes.device)
    for j in range(per_word):
        words |= ((rows[..., j, :] >> shift) & ((1 << width) - 1)).to(torch.int64) << (width * j)
    return _to_int32(words)


def _unpack_plane(words: torch.Tensor, width: int) -> torch.Tensor:
    """int32 [..., K/per_word, N] -> int32 [..., K, N]."""
    per_word = _VALUES_PER_WORD[width]
    *lead, kw, n = words.shape
    shifts = torch.arange(per_word, dtype=torch.int32, device=words.device) * width
    values = (words.unsqueeze(-2) >> shifts[:, None]) & ((1 << width) - 1)
    return values.reshape(*lead, kw * per_word, n)


def pack_codes(codes: torch.Tensor, bits: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Pack integer codes ``[..., K, N]`` in ``[0, 2**bits)`` into ``(q2, q1)`` bit planes.

    ``q2`` is None for 1 bit, ``q1`` is None for even widths.
    """
    check_bits(bits)
    check_packable(codes.shape[-2], [bits], "codes")
    if codes.dtype.is_floating_point or codes.dtype == torch.bool:
        codes = codes.to(torch.int32)  # integer codes are read as they are, without a copy
    n2 = num_two_bit_planes(bits)
    q2 = None
    if n2:
        q2 = torch.stack([_pack_plane(codes, 2 * i, 2) for i in range(n2)], dim=-3)
    q1 = _pack_plane(codes, 2 * n2, 1) if has_one_bit_plane(bits) else None
    return q2, q1


def unpack_codes(q2: torch.Tensor | None, q1: torch.Tensor | None, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: int32 codes ``[..., K, N]``."""
    check_bits(bits)
    n2 = num_two_bit_planes(bits)
    codes = None
    for i in range(n2):
        plane = _unpack_plane(q2[..., i, :, :], 2) << (2 * i)
        codes = plane if codes is None else codes | plane
    if has_one_bit_plane(bits):
        top = _unpack_plane(q1, 1) << (2 * n2)
        codes = top if codes is None else codes | top
    return codes


def packed_shapes(bits: int, k: int, n: int, lead: tuple[int, ...] = ()) -> dict[str, tuple[int, ...]]:
    """Shapes of the planes :func:`pack_codes` returns, to allocate them before the weights arrive."""
    shapes = {}
    if num_two_bit_planes(bits):
        shapes["q2"] = (*lead, num_two_bit_planes(bits), k // 16, n)
    if has_one_bit_plane(bits):
        shapes["q1"] = (*lead, k // 32, n)
    return shapes


def zero_words(bits: int, n: int) -> int:
    """Words per group row of ``bits``-bit integer zero points for ``n`` outputs (``Z`` above)."""
    return num_two_bit_planes(bits) * -(-n // 16) + has_one_bit_plane(bits) * -(-n // 32)


def _pack_along_n(values: torch.Tensor, width: int) -> torch.Tensor:
    """``width``-bit values [..., N] -> int32 [..., ceil(N / per_word)], padded with zeros."""
    per_word = _VALUES_PER_WORD[width]
    *lead, n = values.shape
    padded = torch.nn.functional.pad(values.to(torch.int64), (0, -n % per_word))
    shifts = torch.arange(per_word, dtype=torch.int64, device=values.device) * width
    words = (padded.reshape(*lead, -1, per_word) << shifts).sum(dim=-1)  # disjoint bits: the sum is an OR
    return _to_int32(words)


def _unpack_along_n(words: torch.Tensor, width: int, n: int) -> torch.Tensor:
    per_word = _VALUES_PER_WORD[width]
    shifts = torch.arange(per_word, dtype=torch.int32, device=words.device) * width
    values = (words.unsqueeze(-1) >> shifts) & ((1 << width) - 1)
    return values.flatten(-2)[..., :n]


def pack_zero_codes(zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer zero points ``[..., K/G, N]`` in ``[0, 2**bits)`` -> int32 ``[..., K/G, zero_words]``."""
    check_bits(bits)
    zero = zero.to(torch.int32)
    n2 = num_two_bit_planes(bits)
    planes = [_pack_along_n((zero >> (2 * i)) & 3, 2) for i in range(n2)]
    if has_one_bit_plane(bits):
        planes.append(_pack_along_n((zero >> (2 * n2)) & 1, 1))
    return torch.cat(planes, dim=-1)


def unpack_zero_codes(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_zero_codes`: int32 zero points ``[..., K/G, n]``."""
    check_bits(bits)
    if words.shape[-1] != zero_words(bits, n):
        raise ValueError(
            f"integer zeros of {bits} bits for {n} outputs take {zero_words(bits, n)} words per group, "
            f"got {words.shape[-1]}."
        )
    n2, w2 = num_two_bit_planes(bits), -(-n // 16)
    zero = torch.zeros((*words.shape[:-1], n), dtype=torch.int32, device=words.device)
    for i in range(n2):
        zero |= _unpack_along_n(words[..., i * w2 : (i + 1) * w2], 2, n) << (2 * i)
    if has_one_bit_plane(bits):
        zero |= _unpack_along_n(words[..., n2 * w2 :], 1, n) << (2 * n2)
    return zero
