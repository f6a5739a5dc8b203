"""Host side of the CPU kernels: packed projections for rows grouped by expert, a packed linear,
and a whole SiLU-gated experts layer (routing, gate_up, SiLU(gate) * up, down, weighted sum).

Each is a torch custom op (``moeq::cpu_*``), so ``torch.compile(fullgraph=True)`` sees one opaque
call. The expert projections take and give float32 (the reference path's accumulation dtype); the
SiLU layer and the linear read and write float32 or bf16 themselves. The weights are read from the
bit planes, never dequantized whole. A layer's tensors reach the kernel as the flat plane list of
``PackedLayout.kernel_planes`` and each expert's bit-width; the per-expert address table is made
once per set of addresses, and once per module for eager forwards (``PreparedCall``).
"""

from __future__ import annotations

import torch
from transformers.activations import ACT2FN

from ..quant.layout import FIELDS, PackedLayout
from . import cpu_build

TILE_N = 16  # outputs per kernel tile (packed_gemm.c)
SILU = ("silu", "swish")


def supports(layout: PackedLayout) -> bool:
    """Shapes the kernel tiles: outputs in whole tiles and groups of whole 1-bit-plane words."""
    return layout.group_size % 32 == 0 and all(n % TILE_N == 0 for n, _ in layout.projections.values())


@torch.compiler.assume_constant_result
def kernels_built() -> bool:
    """Whether the kernels build and load here (decided once; a constant to torch.compile)."""
    return cpu_build.library() is not None


def available(layout: PackedLayout, x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and supports(layout) and kernels_built()


def _addresses(planes: list[torch.Tensor | None], expert_bits: list[int]) -> tuple:
    """Everything the address table is made of: per width, each field's address and expert stride."""
    widths = sorted(set(expert_bits))
    key = []
    for w, bits in enumerate(widths):
        fields = planes[len(FIELDS) * w : len(FIELDS) * (w + 1)]
        key.append((bits, tuple((t.data_ptr(), t.stride(0) * t.element_size(), not t.dtype.is_floating_point)
                                if t is not None else None for t in fields)))  # fmt: skip
    return tuple(expert_bits), tuple(key)


def _records(key: tuple):
    """The ctypes table of ``moeq_expert`` records for an address key (a pure function of it)."""
    expert_bits, widths = key
    records = (cpu_build.ExpertRecord * max(len(expert_bits), 1))()
    for bits, fields in widths:
        members = [e for e, b in enumerate(expert_bits) if b == bits]
        for local, expert in enumerate(members):
            records[expert].bits = bits
            for name, field in zip(FIELDS, fields):
                if field is not None:
                    setattr(records[expert], name, field[0] + local * field[1])
            records[expert].zero_codes = fields[FIELDS.index("zero")][2]
    return records


def _checked_records(planes: list[torch.Tensor | None], expert_bits: list[int]):
    if any(t is not None and not t.is_contiguous() for t in planes):
        raise ValueError("packed expert tensors must be contiguous for the CPU kernels.")
    return _records(_addresses(planes, expert_bits))


def _check(status: int) -> None:
    if status:
        raise MemoryError("optimum-moeq's CPU kernel could not allocate its scratch buffers.")


_TABLES: dict[tuple, object] = {}


def _table(planes: list[torch.Tensor | None], expert_bits: list[int]):
    """The address table of a layer's planes. Looked up by each plane's address and expert stride
    alone (every forward of every layer asks); contiguity is checked when a table is made."""
    key = (tuple(expert_bits), tuple((t.data_ptr(), t.stride(0), t.dtype) if t is not None else None for t in planes))
    table = _TABLES.get(key)
    if table is None:
        if len(_TABLES) >= 1024:  # addresses of freed models
            _TABLES.clear()
        table = _TABLES[key] = _checked_records(planes, expert_bits)
    return table


def _gemm(x, seg_start, seg_expert, planes, expert_bits, n, group_size, portable=False, library=None):
    bf16_rows = int(x.dtype == torch.bfloat16)  # exact bf16 values: the kernel may take bf16 dot products
    x = x.float().contiguous()
    y = torch.empty(x.shape[0], n, dtype=torch.float32)
    if x.shape[0] == 0:
        return y
    library = library or cpu_build.library()
    status = library.moeq_packed_gemm(
        x.data_ptr(), y.data_ptr(), x.shape[1], n, group_size, seg_expert.numel(), seg_start.data_ptr(),
        seg_expert.data_ptr(), _table(planes, expert_bits), torch.get_num_threads(), int(portable), bf16_rows,
    )  # fmt: skip
    _check(status)
    return y


def _experts_gemm(
    x: torch.Tensor,
    seg_start: torch.Tensor,
    seg_expert: torch.Tensor,
    planes: list[torch.Tensor | None],
    expert_bits: list[int],
    n: int,
    group_size: int,
    portable: bool = False,
) -> torch.Tensor:
    return _gemm(x, seg_start, seg_expert, planes, expert_bits, n, group_size, portable)


IO_DTYPES = (torch.float32, torch.bfloat16)  # what the SiLU layer and linear kernels read and write as they are


def _kernel_input(t: torch.Tensor, bf16_flag: int) -> tuple[torch.Tensor, int]:
    """``t`` as the kernel reads it, contiguous: bf16 as it is (with ``bf16_flag``), float32 as it
    is, anything else as float32; no conversion for the model's own dtypes, where decode's Python
    time is spent."""
    if t.dtype == torch.bfloat16:
        return t.contiguous(), bf16_flag
    return (t if t.dtype == torch.float32 else t.float()).contiguous(), 0


def _run_linear(record, x: torch.Tensor, n: int, group_size: int) -> torch.Tensor:
    """A packed linear (a one-expert ``cpu_build.ExpertRecord`` table) on x [..., K], out [..., n]
    in x's dtype (float32 or bf16; others go as float32), a bf16 out rounded in the kernel."""
    k = x.shape[-1]
    rows, flags = _kernel_input(x.reshape(-1, k), cpu_build.IO_BF16)
    y = torch.empty(rows.shape[0], n, dtype=rows.dtype)
    _check(cpu_build.library().moeq_linear(
        record, rows.data_ptr(), rows.shape[0], k, n, group_size, y.data_ptr(), torch.get_num_threads(), flags,
    ))  # fmt: skip
    return y.reshape(*x.shape[:-1], n)


def _packed_linear(
    x: torch.Tensor, planes: list[torch.Tensor | None], bits: int, n: int, group_size: int
) -> torch.Tensor:
    return _run_linear(_table(planes, [bits]), x, n, group_size)


def _run_silu(layer, x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
    """A SiLU-gated layer (a ``cpu_build.LayerRecord``) on x [T, H], out in x's dtype (float32 or
    bf16; others go as float32). bf16 x and routing weights are read as they are, and out is rounded
    from the float32 sum in the kernel."""
    x, io_flag = _kernel_input(x, cpu_build.IO_BF16)
    weights, weight_flag = _kernel_input(top_k_weights, cpu_build.WEIGHT_BF16)
    index = (top_k_index if top_k_index.dtype == torch.int64 else top_k_index.long()).contiguous()
    out = torch.empty(x.shape, dtype=x.dtype)
    _check(cpu_build.library().moeq_experts_forward(
        layer, x.data_ptr(), x.shape[0], index.shape[-1], index.data_ptr(), weights.data_ptr(), out.data_ptr(),
        torch.get_num_threads(), io_flag | weight_flag,
    ))  # fmt: skip
    return out


def _silu_experts(
    x: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up_planes: list[torch.Tensor | None],
    down_planes: list[torch.Tensor | None],
    expert_bits: list[int],
    intermediate_dim: int,
    group_size: int,
) -> torch.Tensor:
    layer = cpu_build.LayerRecord(len(expert_bits), x.shape[-1], intermediate_dim, group_size,
                                  _table(gate_up_planes, expert_bits), _table(down_planes, expert_bits))  # fmt: skip
    return _run_silu(layer, x, top_k_index, top_k_weights)


def _tensor_key(tensors) -> tuple:
    """Which tensors these are and how they lie: a new object, storage, view or dtype changes it."""
    return tuple((id(t), t.data_ptr(), t.stride(), t.dtype) for t in tensors.values() if t is not None)


class PreparedCall:
    """A module's kernel call made ready once, its address tables and shapes in C records, so that
    an eager forward runs a few lines of Python (decode calls every layer for every token). Made
    from a module's tensors; ``holds`` tells whether the module still has those very tensors (a new
    load, ``.to()`` or an assignment replaces them)."""

    def __init__(self, tensors):
        self._key = _tensor_key(tensors)

    def holds(self, tensors) -> bool:
        return _tensor_key(tensors) == self._key


class SiluExpertsCall(PreparedCall):
    """A SiLU-gated experts layer: ``call(x, top_k_index, top_k_weights)`` as ``silu_experts``."""

    def __init__(self, layout: PackedLayout, tensors, input_projection: str, intermediate_dim: int):
        super().__init__(tensors)
        bits = list(layout.expert_bits)
        self._tables = (
            _checked_records(layout.kernel_planes(tensors, input_projection), bits),
            _checked_records(layout.kernel_planes(tensors, "down_proj"), bits),
        )
        hidden = layout.projections["down_proj"][0]
        self.layer = cpu_build.LayerRecord(len(bits), hidden, intermediate_dim, layout.group_size, *self._tables)

    def __call__(self, x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        return _run_silu(self.layer, x, top_k_index, top_k_weights)


class LinearCall(PreparedCall):
    """A packed linear: ``call(x)`` is [..., in] -> [..., out] in x's dtype (float32 or bf16 read
    and written as they are, others as float32), without the bias."""

    def __init__(self, layout: PackedLayout, tensors):
        super().__init__(tensors)
        self.n = layout.projections["weight"][0]
        self.group_size = layout.group_size
        self._record = _checked_records(layout.kernel_planes(tensors, "weight"), [layout.expert_bits[0]])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return _run_linear(self._record, x, self.n, self.group_size)


# Custom ops, so that torch.compile(fullgraph=True) sees one opaque call each; eager calls go to the
# functions directly (the dispatcher costs about 20 us a call, benchmarks/results/notes.md).
_experts_gemm_op = torch.library.custom_op("moeq::cpu_experts_gemm", _experts_gemm, mutates_args=())
_packed_linear_op = torch.library.custom_op("moeq::cpu_linear", _packed_linear, mutates_args=())
_silu_experts_op = torch.library.custom_op("moeq::cpu_silu_experts", _silu_experts, mutates_args=())


@_experts_gemm_op.register_fake
def _(x, seg_start, seg_expert, planes, expert_bits, n, group_size, portable=False):
    return x.new_empty((x.shape[0], n), dtype=torch.float32)


@_packed_linear_op.register_fake
def _(x, planes, bits, n, group_size):
    return x.new_empty((x.shape[0], n), dtype=x.dtype if x.dtype in IO_DTYPES else torch.float32)


@_silu_experts_op.register_fake
def _(x, top_k_index, top_k_weights, gate_up_planes, down_planes, expert_bits, intermediate_dim, group_size):
    return x.new_empty(x.shape, dtype=x.dtype if x.dtype in IO_DTYPES else torch.float32)


def experts_gemm(x, seg_start, seg_expert, planes, expert_bits, n, group_size, portable=False) -> torch.Tensor:
    """float32 [R, n]: row r of ``x`` [R, K] times the weight of its segment's expert (rows
    ``seg_start[s]:seg_start[s+1]``, int32, use expert ``seg_expert[s]``). ``portable`` takes the
    library's plain-C path (the one machines without AVX2 run)."""
    gemm = _experts_gemm_op if torch.compiler.is_compiling() else _experts_gemm
    return gemm(x, seg_start, seg_expert, planes, expert_bits, n, group_size, portable)


def packed_linear_cpu(x, planes, bits, n, group_size) -> torch.Tensor:
    """[R, n] = x [R, K] @ W.T for one packed weight (planes with a one-expert axis), in x's dtype
    (float32 or bf16; float32 for others)."""
    linear = _packed_linear_op if torch.compiler.is_compiling() else _packed_linear
    return linear(x, planes, bits, n, group_size)


def silu_experts(x, top_k_index, top_k_weights, gate_up_planes, down_planes, expert_bits, intermediate_dim,
                 group_size) -> torch.Tensor:  # fmt: skip
    """[T, H] in x's dtype (float32 or bf16; float32 for others): a SiLU-gated experts layer in one
    kernel call, routing included; pairs whose expert index is outside [0, E) contribute nothing."""
    layer = _silu_experts_op if torch.compiler.is_compiling() else _silu_experts
    return layer(x, top_k_index, top_k_weights, gate_up_planes, down_planes, expert_bits, intermediate_dim,
                 group_size)  # fmt: skip


def segments(expert_of_row: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(seg_start int32 [S+1], seg_expert int32 [S]) of rows already sorted by expert."""
    experts, counts = torch.unique_consecutive(expert_of_row, return_counts=True)
    seg_start = torch.zeros(experts.numel() + 1, dtype=torch.int32)
    torch.cumsum(counts, 0, out=seg_start[1:])
    return seg_start, experts.to(torch.int32)


def experts_forward(
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    layout: PackedLayout,
    tensors,
    *,
    input_projection: str,
    intermediate_dim: int,
    activation: str,
    gated: bool,
) -> torch.Tensor:
    """The experts layer on CPU: [T, H] in ``hidden_states``' dtype. Pairs (token, slot) whose
    expert index is outside [0, E) (experts held elsewhere, dropped tokens) contribute nothing.
    SiLU-gated experts (Mixtral, Qwen-MoE, DeepSeek, OLMoE) in float32 or bf16 run as one call into
    the kernels, routing included; other activations and float16 run the two projections from here.
    The down projection's input is rounded to the model's dtype, as transformers' dense experts and
    the Triton kernels round it (``kernels.reference`` too)."""
    bits = list(layout.expert_bits)
    gate_up_planes = layout.kernel_planes(tensors, input_projection)
    down_planes = layout.kernel_planes(tensors, "down_proj")
    if gated and activation in SILU and hidden_states.dtype != torch.float16:
        out = silu_experts(hidden_states, top_k_index, top_k_weights, gate_up_planes, down_planes, bits,
                           intermediate_dim, layout.group_size)  # fmt: skip
        return out.to(hidden_states.dtype)  # float64 went as float32
    tokens, hidden = hidden_states.shape
    flat_expert = top_k_index.reshape(-1)
    pair = torch.nonzero((flat_expert >= 0) & (flat_expert < layout.num_experts)).squeeze(-1)
    pair = pair[torch.argsort(flat_expert[pair], stable=True)]
    seg_start, seg_expert = segments(flat_expert[pair])
    token = pair // top_k_index.shape[-1]
    n_in = (2 if gated else 1) * intermediate_dim
    h = experts_gemm(hidden_states[token], seg_start, seg_expert, gate_up_planes, bits, n_in, layout.group_size)
    act_fn = ACT2FN[activation]
    if gated:
        gate, up = h.chunk(2, dim=-1)
        h = act_fn(gate) * up
    else:
        h = act_fn(h)
    y = experts_gemm(h.to(hidden_states.dtype), seg_start, seg_expert, down_planes, bits, hidden, layout.group_size)
    y *= top_k_weights.reshape(-1)[pair, None].float()
    out = torch.zeros(tokens, hidden, dtype=torch.float32)
    out.index_add_(0, token, y)
    return out.to(hidden_states.dtype)


def linear_forward(x: torch.Tensor, layout: PackedLayout, tensors) -> torch.Tensor:
    """A packed linear ([..., in] -> [..., out] in ``x``'s dtype)."""
    n, k = layout.projections["weight"]
    bits = layout.expert_bits[0]
    y = packed_linear_cpu(x.reshape(-1, k), layout.kernel_planes(tensors, "weight"), bits, n, layout.group_size)
    return y.to(x.dtype).reshape(*x.shape[:-1], n)  # float16 and float64 went as float32
