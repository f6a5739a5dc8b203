"""Bases of the replacement modules: how quantized tensors are declared, stored and kept.

Every replacement (mixed-bit experts, packed linears, bitsandbytes linears) declares its stored
tensors by name (``stored_specs``), receives full-precision weights named after
``projection_shapes`` while loading (placeholders, dropped once quantized), and takes its
quantized tensors through ``store``, whichever quantizer made them.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping

import torch
from torch import nn

from ..kernels import cpu_moe
from ..kernels.grouped import use_triton
from ..quant import GroupQuantized, PackedProjection, pack_projection, quantize_weight
from ..quant.layout import PackedLayout
from ..quant.packed import concat_packed

KERNELS = ("auto", "torch", "triton", "cpu")

# Each module's prepared CPU kernel call and the ``kernel`` setting it was made under, beside the
# module rather than in it: a ctypes record neither deep-copies nor pickles.
_CPU_CALLS: weakref.WeakKeyDictionary[nn.Module, tuple[str, cpu_moe.PreparedCall]] = weakref.WeakKeyDictionary()

# Experts of a width are quantized together (batched GPTQ) while their working set stays under
# this: about 32 bytes per weight (float64 weights and their copies, int32 codes) and 24 per entry
# of a K x K Hessian (it, its factor and their copies). Larger experts go one at a time (a
# Mixtral-8x7B gate_up expert is 4.2 GB of it).
_WORKING_SET_BYTES = 2**31


def _working_set_bytes(n: int, k: int) -> int:
    return 32 * n * k + 24 * k * k


# (full-precision weights of the experts sharing a width [E_b, N, K] (or one weight [N, K]), bits,
# those experts' indices) -> their quantized form. GPTQ supplies one with its Hessians.
QuantizeFn = Callable[[torch.Tensor, int, tuple[int, ...]], GroupQuantized]


class QuantizedModule(nn.Module):
    """Stored tensors keep their dtype under ``model.to(dtype)``, ``.half()`` or ``.bfloat16()``;
    only their device follows. The codes were chosen against those exact float16 (or float32)
    values: casting them would silently change the weights, and save them that way. The bias and
    the full-precision placeholders cast as usual."""

    projection_shapes: dict[str, tuple[int, ...]]

    def stored_specs(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        raise NotImplementedError

    def _declare_storage(self, with_full_precision_placeholders: bool) -> None:
        for name, (shape, dtype) in self.stored_specs().items():
            self.register_parameter(name, nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False))
        if with_full_precision_placeholders:
            # Each receives the checkpoint's weight during quantize-on-load, then is dropped.
            for proj, shape in self.projection_shapes.items():
                self.register_parameter(proj, nn.Parameter(torch.empty(shape), requires_grad=False))

    def store(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Take quantized tensors (by stored name) as this module's parameters."""
        specs = self.stored_specs()
        for name, tensor in tensors.items():
            if name not in specs:
                raise ValueError(f"{type(self).__name__} stores no tensor named {name!r}; it stores {sorted(specs)}.")
            shape, dtype = specs[name]
            if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
                raise ValueError(
                    f"{name}: got {tuple(tensor.shape)} {tensor.dtype}, this module stores {tuple(shape)} {dtype}."
                )
            self.register_parameter(name, nn.Parameter(tensor, requires_grad=False))

    def drop_placeholder(self, proj: str) -> None:
        self._parameters.pop(proj, None)

    def _apply(self, fn, recurse=True):
        stored = {id(p) for name, p in self._parameters.items() if p is not None and name in self.stored_specs()}

        def keep_dtype(tensor: torch.Tensor) -> torch.Tensor:
            if id(tensor) not in stored:
                return fn(tensor)
            target = fn(torch.empty(0, dtype=tensor.dtype, device=tensor.device))  # where fn sends such a tensor
            return fn(tensor) if target.dtype == tensor.dtype else tensor.to(device=target.device)

        return super()._apply(keep_dtype, recurse)


class PackedModule(QuantizedModule):
    """A module stored in the packed format, described by its ``layout``: quantizes, stores and
    hands its tensors to the kernels by the layout's names. ``kernel="torch"``, ``"triton"`` or
    ``"cpu"`` forces a compute path (Triton runs on CPU under TRITON_INTERPRET=1); "auto" takes
    Triton for CUDA inputs and the compiled CPU kernels for CPU inputs where they build here
    (else the torch reference)."""

    layout: PackedLayout
    method: str
    kernel: str = "auto"

    def stored_specs(self):
        return self.layout.specs()

    @property
    def group_size(self) -> int:
        return self.layout.group_size

    def _tensors(self) -> dict[str, torch.Tensor]:
        return self._parameters

    def packed(self, proj: str, bits: int) -> PackedProjection:
        """All experts of ``bits`` bits for projection ``proj``."""
        return self.layout.packed(self._tensors(), proj, bits)

    def expert_projection(self, proj: str, expert: int) -> PackedProjection:
        return self.layout.expert(self._tensors(), proj, expert)

    def store_packed(self, proj: str, packed: PackedProjection) -> None:
        self.store(self.layout.named(proj, packed))

    def quantize_projection(
        self, proj: str, weight: torch.Tensor, quantize: QuantizeFn | None = None
    ) -> dict[str, torch.Tensor]:
        """Packed tensors, by stored name, for the full-precision ``weight`` of ``proj`` ([E, N, K],
        or [N, K] for one weight); ``quantize`` defaults to the module's calibration-free method."""
        layout = self.layout
        expected = tuple(self.projection_shapes[proj])
        if tuple(weight.shape) != expected:
            raise ValueError(f"{proj} weight has shape {tuple(weight.shape)}, expected {expected}.")
        quantize = quantize or (
            lambda w, bits, _: quantize_weight(w, bits, layout.group_size, self.method, layout.integer_zeros)
        )
        tensors = {}
        n, k = expected[-2:]
        per_call = max(1, _WORKING_SET_BYTES // _working_set_bytes(n, k))
        for bits, members in layout.members.items():
            if not layout.stacked:
                packed = pack_projection(quantize(weight, bits, members), layout.integer_zeros)
            else:  # each batch packed as soon as it is quantized: its int32 codes are 16x its planes
                batches = [members[i : i + per_call] for i in range(0, len(members), per_call)]
                packed = concat_packed(
                    [pack_projection(quantize(weight[list(b)], bits, b), layout.integer_zeros) for b in batches]
                )
            tensors.update(layout.named(proj, packed))
        return tensors

    def _prepared_cpu_call(self, x: torch.Tensor):
        """The ready kernel call of an eager forward of CPU inputs in float32 or bf16 (see
        ``_make_cpu_call``), or None where another path runs. Made once, and again when ``kernel``
        or the module's tensors change."""
        if x.device.type != "cpu" or x.dtype not in cpu_moe.IO_DTYPES or torch.compiler.is_compiling():
            return None
        kernel, call = _CPU_CALLS.get(self, (None, None))
        if call is not None and kernel == self.kernel and call.holds(self._parameters):
            return call
        if self._use_triton(x) or not self._use_cpu_kernels(x):
            return None
        call = self._make_cpu_call()
        if call is not None:
            _CPU_CALLS[self] = (self.kernel, call)
        return call

    def _make_cpu_call(self) -> cpu_moe.PreparedCall | None:
        """The module's prepared CPU kernel call, or None where its forward has none."""
        return None

    def _use_triton(self, x: torch.Tensor) -> bool:
        if self.kernel not in KERNELS:
            raise ValueError(f"kernel={self.kernel!r} is not supported: allowed are {KERNELS}.")
        return self.kernel != "cpu" and use_triton(self.kernel, self.group_size, x.is_cuda)

    def _use_cpu_kernels(self, x: torch.Tensor) -> bool:
        """The compiled CPU kernels for this input (after ``_use_triton`` said no)."""
        if self.kernel == "cpu":
            if not cpu_moe.supports(self.layout) or x.device.type != "cpu":
                raise ValueError(
                    f"kernel='cpu' needs CPU inputs (got {x.device.type}), a group_size that is a multiple of 32 "
                    f"(got {self.group_size}) and output sizes that are multiples of {cpu_moe.TILE_N} "
                    f"({self.layout.projections}); use kernel='auto'."
                )
            if not cpu_moe.kernels_built():
                raise RuntimeError("kernel='cpu': the CPU kernels could not be built here (see the warning above).")
            return True
        return self.kernel == "auto" and cpu_moe.available(self.layout, x)
