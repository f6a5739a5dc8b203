"""The mixed-bit experts module that replaces a MoE layer's experts.

Experts of one bit-width share one tensor per projection and per stored field (see
``quant/packed.py``), named ``{projection}_b{bits}_{field}``, e.g. ``gate_up_proj_b3_q2``.
The forward keeps transformers' experts contract: ``forward(hidden_states, top_k_index,
top_k_weights)`` with hidden_states [T, H], top_k_index / top_k_weights [T, k]. CUDA inputs take
the Triton kernels (one launch per bit-width per projection), CPU inputs the torch reference;
``kernel="torch"`` or ``"triton"`` forces one (the latter runs on CPU under TRITON_INTERPRET=1).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers.activations import ACT2FN

from ..kernels.grouped import block_k_for, grouped_experts_forward, triton_available
from ..kernels.reference import packed_linear
from ..quant import PackedProjection, check_group_size, pack_projection, packed_tensor_shapes, quantize_weight
from ..quant.packing import check_bits, check_packable
from .stored import QuantizedModule

KERNELS = ("auto", "torch", "triton")


class MixedBitExperts(QuantizedModule):
    """Experts each at its own bit-width: gated (``gate_up_proj`` [E, 2I, H] holding gate then up,
    act(gate) * up) or not (``up_proj`` [E, I, H], act(up)), then ``down_proj`` [E, H, I]."""

    kernel: str = "auto"

    def __init__(
        self,
        expert_bits: Sequence[int],
        hidden_dim: int,
        intermediate_dim: int,
        group_size: int,
        hidden_act: str = "silu",
        method: str = "rtn",
        with_full_precision_placeholders: bool = False,
        name: str = "experts",
        gated: bool = True,
    ):
        super().__init__()
        for b in expert_bits:
            check_bits(b)
        self.expert_bits = list(expert_bits)
        self.num_experts = len(self.expert_bits)
        self.hidden_dim = hidden_dim
        self.intermediate_dim = intermediate_dim
        self.group_size = group_size
        self.hidden_act = hidden_act
        self.method = method
        self.gated = gated
        self.act_fn = ACT2FN[hidden_act]
        self.bit_widths = sorted(set(self.expert_bits))
        self.members = {b: [e for e, eb in enumerate(self.expert_bits) if eb == b] for b in self.bit_widths}
        self._slot = {e: (b, self.members[b].index(e)) for e, b in enumerate(self.expert_bits)}
        # (out features N, in features K) of each projection
        self.input_projection = "gate_up_proj" if gated else "up_proj"
        self.projection_shapes = {
            self.input_projection: ((2 if gated else 1) * intermediate_dim, hidden_dim),
            "down_proj": (hidden_dim, intermediate_dim),
        }
        for proj, (n, k) in self.projection_shapes.items():
            check_group_size(group_size, k, f"{name}.{proj}")
            check_packable(k, self.bit_widths, f"{name}.{proj}")
            for b in self.bit_widths:
                specs = packed_tensor_shapes(b, n, k, group_size, lead=(len(self.members[b]),))
                for field, (shape, dtype) in specs.items():
                    param = nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)
                    self.register_parameter(f"{proj}_b{b}_{field}", param)
            if with_full_precision_placeholders:
                # Receives the checkpoint's weight during quantize-on-load, then is dropped.
                self.register_parameter(proj, nn.Parameter(torch.empty(self.num_experts, n, k), requires_grad=False))

    def packed(self, proj: str, bits: int) -> PackedProjection:
        """All experts of ``bits`` bits for projection ``proj``."""
        fields = {f: getattr(self, f"{proj}_b{bits}_{f}", None) for f in ("q2", "q1", "scale", "zero")}
        return PackedProjection(bits=bits, **fields)

    def expert_projection(self, proj: str, expert: int) -> PackedProjection:
        bits, index = self._slot[expert]
        group = self.packed(proj, bits)
        return PackedProjection(bits, **{f: t[index] for f, t in group.tensors().items()})

    def quantize_projection(self, proj: str, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        """Packed tensors, by parameter name, for the full-precision ``weight`` [E, N, K] of ``proj``."""
        expected = (self.num_experts, *self.projection_shapes[proj])
        if tuple(weight.shape) != expected:
            raise ValueError(f"{proj} weight has shape {tuple(weight.shape)}, expected {expected}.")
        tensors = {}
        for b in self.bit_widths:
            quantized = quantize_weight(weight[self.members[b]], b, self.group_size, self.method)
            for field, tensor in pack_projection(quantized).tensors().items():
                tensors[f"{proj}_b{b}_{field}"] = tensor
        return tensors

    def drop_placeholder(self, proj: str) -> None:
        self._parameters.pop(proj, None)

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        if self._use_triton(hidden_states):
            return grouped_experts_forward(
                hidden_states,
                top_k_index,
                top_k_weights,
                {b: self.packed(self.input_projection, b) for b in self.bit_widths},
                {b: self.packed("down_proj", b) for b in self.bit_widths},
                self.expert_bits,
                intermediate_dim=self.intermediate_dim,
                group_size=self.group_size,
                activation=self.hidden_act,
                gated=self.gated,
            )
        return self._reference_forward(hidden_states, top_k_index, top_k_weights)

    def _use_triton(self, hidden_states: torch.Tensor) -> bool:
        if self.kernel not in KERNELS:
            raise ValueError(f"kernel={self.kernel!r} is not supported: allowed are {KERNELS}.")
        if self.kernel == "torch":
            return False
        usable = triton_available() and block_k_for(self.group_size) is not None
        if self.kernel == "triton" and not usable:
            raise ValueError(
                f"kernel='triton' needs the triton package and a group_size with a power-of-two divisor >= 16, "
                f"got group_size={self.group_size}; install optimum-moeq[gpu] or use kernel='torch'."
            )
        return self.kernel == "triton" or (usable and hidden_states.is_cuda)

    def _reference_forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        # Accumulate in float32 so bf16/fp16 sums over top-k do not round at every add.
        out = torch.zeros(hidden_states.shape, dtype=torch.float32, device=hidden_states.device)
        for expert in torch.unique(top_k_index).tolist():
            if expert >= self.num_experts:  # index used for experts on another rank
                continue
            token_idx, k_pos = torch.where(top_k_index == expert)
            h = packed_linear(hidden_states[token_idx], self.expert_projection(self.input_projection, expert))
            if self.gated:
                gate, up = h.chunk(2, dim=-1)
                h = self.act_fn(gate) * up
            else:
                h = self.act_fn(h)
            y = packed_linear(h, self.expert_projection("down_proj", expert))
            out.index_add_(0, token_idx, (y * top_k_weights[token_idx, k_pos, None]).float())
        return out.to(hidden_states.dtype)

    def extra_repr(self) -> str:
        counts = ", ".join(f"{len(self.members[b])}x{b}-bit" for b in self.bit_widths)
        return (
            f"num_experts={self.num_experts} ({counts}), hidden_dim={self.hidden_dim}, "
            f"intermediate_dim={self.intermediate_dim}, group_size={self.group_size}"
        )


class MixedBitOneHotExperts(MixedBitExperts):
    """Takes the experts-module contract of Switch Transformers: ``forward(hidden_states,
    selected_experts, routing_weights)`` with a one-hot expert mask [T, 1, E] (all zero for
    tokens over capacity) and routing weights [T, 1]."""

    def forward(
        self, hidden_states: torch.Tensor, selected_experts: torch.Tensor, routing_weights: torch.Tensor
    ) -> torch.Tensor:
        mask = selected_experts.reshape(hidden_states.shape[0], -1)
        routed = mask.any(dim=-1, keepdim=True)
        # Dropped tokens get the "expert held elsewhere" index, which contributes nothing.
        top_k_index = torch.where(routed, mask.argmax(dim=-1, keepdim=True), self.num_experts)
        return super().forward(hidden_states, top_k_index, routing_weights.reshape(-1, 1))
