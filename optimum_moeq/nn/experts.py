"""The mixed-bit experts module that replaces a MoE layer's experts.

Experts of one bit-width share one tensor per projection and per stored field, as the module's
``layout`` (``quant/layout.py``) names and shapes them. The forward keeps transformers' experts
contract: ``forward(hidden_states, top_k_index, top_k_weights)`` with hidden_states [T, H],
top_k_index / top_k_weights [T, k]. CUDA inputs take the Triton kernels (one launch per bit-width
per projection), CPU inputs the compiled CPU kernels (``kernels/cpu``) or, where those cannot
build, the torch reference (see ``PackedModule.kernel``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers.activations import ACT2FN

from ..kernels.cpu_moe import SILU, SiluExpertsCall, experts_forward
from ..kernels.grouped import grouped_experts_forward
from ..kernels.reference import experts_reference
from ..quant.layout import PackedLayout
from .stored import PackedModule


class MixedBitExperts(PackedModule):
    """Experts each at its own bit-width: gated (``gate_up_proj`` [E, 2I, H] holding gate then up,
    act(gate) * up) or not (``up_proj`` [E, I, H], act(up)), then ``down_proj`` [E, H, I]."""

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
        integer_zeros: bool = False,
    ):
        super().__init__()
        self.hidden_dim = hidden_dim
        self.intermediate_dim = intermediate_dim
        self.hidden_act = hidden_act
        self.method = method
        self.gated = gated
        self.act_fn = ACT2FN[hidden_act]
        self.input_projection = "gate_up_proj" if gated else "up_proj"
        # (out features N, in features K) of each projection
        shapes = {
            self.input_projection: ((2 if gated else 1) * intermediate_dim, hidden_dim),
            "down_proj": (hidden_dim, intermediate_dim),
        }
        self.layout = PackedLayout(expert_bits, shapes, group_size, name=name, integer_zeros=integer_zeros)
        self.projection_shapes = {proj: (self.num_experts, n, k) for proj, (n, k) in shapes.items()}
        self._declare_storage(with_full_precision_placeholders)

    @property
    def expert_bits(self) -> list[int]:
        return list(self.layout.expert_bits)

    @property
    def num_experts(self) -> int:
        return self.layout.num_experts

    @property
    def bit_widths(self) -> tuple[int, ...]:
        return self.layout.bit_widths

    @property
    def members(self) -> dict[int, tuple[int, ...]]:
        return self.layout.members

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        call = self._prepared_cpu_call(hidden_states)
        if call is not None:
            return call(hidden_states, top_k_index, top_k_weights)
        if self._use_triton(hidden_states):
            return grouped_experts_forward(
                hidden_states, top_k_index, top_k_weights, self.layout, self._parameters,
                input_projection=self.input_projection, intermediate_dim=self.intermediate_dim,
                activation=self.hidden_act, gated=self.gated,
            )  # fmt: skip
        if self._use_cpu_kernels(hidden_states):
            return experts_forward(
                hidden_states, top_k_index, top_k_weights, self.layout, self._parameters,
                input_projection=self.input_projection, intermediate_dim=self.intermediate_dim,
                activation=self.hidden_act, gated=self.gated,
            )  # fmt: skip
        return self._reference_forward(hidden_states, top_k_index, top_k_weights)

    def _make_cpu_call(self) -> SiluExpertsCall | None:
        if self.gated and self.hidden_act in SILU:
            return SiluExpertsCall(self.layout, self._parameters, self.input_projection, self.intermediate_dim)
        return None

    def _reference_forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        return experts_reference(
            hidden_states, top_k_index, top_k_weights, self.layout, self._tensors(),
            input_projection=self.input_projection, act_fn=self.act_fn, gated=self.gated,
        )  # fmt: skip

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
