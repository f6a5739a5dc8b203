"""Per-expert weight quantizers and the packed bit-plane format."""

from .hqq import check_hqq_zeros, quantize_hqq
from .packed import PackedProjection, pack_projection, packed_tensor_shapes
from .packing import MAX_BITS, MIN_BITS, check_bits, pack_codes, unpack_codes
from .rtn import METADATA_DTYPE, GroupQuantized, check_group_size, dequantize, quantize_rtn

QUANTIZATION_METHODS = ("rtn", "hqq", "gptq")  # gptq needs calibration: see calibration.py


def quantize_weight(
    weight, bits: int, group_size: int, method: str = "rtn", integer_zero: bool = False
) -> GroupQuantized:
    """Quantize ``weight`` ``[..., N, K]`` with the named calibration-free method (for "gptq", its
    calibration-free fallback, rtn); ``integer_zero``: zero points on the code grid."""
    if method in ("rtn", "gptq"):
        return quantize_rtn(weight, bits, group_size, integer_zero)
    if method == "hqq":
        check_hqq_zeros(integer_zero)
        return quantize_hqq(weight, bits, group_size)
    raise ValueError(f"method={method!r} is not supported: allowed are {QUANTIZATION_METHODS}.")


__all__ = [
    "MAX_BITS",
    "METADATA_DTYPE",
    "MIN_BITS",
    "QUANTIZATION_METHODS",
    "GroupQuantized",
    "PackedProjection",
    "check_bits",
    "check_group_size",
    "dequantize",
    "pack_codes",
    "pack_projection",
    "packed_tensor_shapes",
    "quantize_hqq",
    "quantize_rtn",
    "quantize_weight",
    "unpack_codes",
]
