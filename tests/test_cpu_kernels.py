"""The compiled CPU kernels (kernels/cpu/packed_gemm.c) against float64 references built from
the stored codes, at every width, for decode- and prefill-sized inputs, both code paths (AVX2
and portable C), any thread count; and the fallback where they cannot be built."""

import pytest
import torch
from conftest import tiny_mixtral_config
from transformers import AutoModelForCausalLM, MixtralForCausalLM

from optimum_moeq import RouterNormConfig
from optimum_moeq.kernels import cpu_build, cpu_moe
from optimum_moeq.kernels.reference import dequantize_packed
from optimum_moeq.nn import MixedBitExperts, PackedLinear

H, INTER, G = 64, 96, 32
BITS = [1, 2, 3, 4, 5, 6, 7, 8]

pytestmark = pytest.mark.skipif(cpu_build.library() is None, reason="no C compiler with OpenMP here")


# float16 zeros (format 1) and b-bit integer zeros packed along N (format 2)
ZEROS = pytest.mark.parametrize("integer_zeros", [False, True], ids=["float_zeros", "integer_zeros"])


def _module(bits=BITS, seed=0, integer_zeros=False):
    torch.manual_seed(seed)
    module = MixedBitExperts(bits, hidden_dim=H, intermediate_dim=INTER, group_size=G, integer_zeros=integer_zeros)
    for proj, (e, n, k) in module.projection_shapes.items():
        module.store(module.quantize_projection(proj, torch.randn(e, n, k) * 0.05))
    return module


def _expected_f64(module, x, top_k_index, top_k_weights, intermediate_dtype=None):
    """Each routed pair through its dequantized float64 weights, one token at a time; the down
    projection's input rounded to ``intermediate_dtype`` if given."""
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for slot, expert in enumerate(top_k_index[t].tolist()):
            if not 0 <= expert < module.num_experts:
                continue
            gate_up = dequantize_packed(module.expert_projection("gate_up_proj", expert)).double()
            down = dequantize_packed(module.expert_projection("down_proj", expert)).double()
            gate, up = (gate_up @ x[t].double()).chunk(2)
            h = torch.nn.functional.silu(gate) * up
            if intermediate_dtype is not None:
                h = h.to(intermediate_dtype).double()
            out[t] += top_k_weights[t, slot].double() * (down @ h)
    return out


def _relative(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@ZEROS
@pytest.mark.parametrize("tokens", [1, 3, 40])
def test_experts_layer_equals_the_float64_reference_at_every_width(tokens, integer_zeros):
    module = _module(integer_zeros=integer_zeros)
    assert (module.gate_up_proj_b3_zero.dtype == torch.int32) == integer_zeros
    generator = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, H, generator=generator)
    top_k_index = torch.randint(0, len(BITS), (tokens, 2), generator=generator)
    top_k_index[0] = torch.tensor([0, 7])  # the 1-bit and the 8-bit expert
    top_k_weights = torch.softmax(torch.randn(tokens, 2, generator=generator), dim=-1)
    module.kernel = "cpu"
    out = module(x, top_k_index, top_k_weights)
    assert out.dtype == torch.float32 and out.shape == (tokens, H)
    assert _relative(out, _expected_f64(module, x, top_k_index, top_k_weights)) < 1e-5
    out_bf16 = module(x.bfloat16(), top_k_index, top_k_weights.bfloat16())
    assert out_bf16.dtype == torch.bfloat16
    expected_bf16 = _expected_f64(module, x.bfloat16(), top_k_index, top_k_weights.bfloat16())
    assert _relative(out_bf16, expected_bf16) < 4e-3  # bf16's own rounding of the output: 2^-9


@ZEROS
@pytest.mark.parametrize("bits", BITS)
def test_each_width_alone_through_the_avx2_and_the_portable_path(bits, integer_zeros):
    module = _module([bits, bits], seed=bits, integer_zeros=integer_zeros)
    planes = module.layout.kernel_planes(module._parameters, "gate_up_proj")
    x = torch.randn(9, H, generator=torch.Generator().manual_seed(bits))
    # one row (the decode path: table lookups for a 1-bit plane), then two blocks of four
    seg_start, seg_expert = torch.tensor([0, 1, 9], dtype=torch.int32), torch.tensor([1, 0], dtype=torch.int32)
    weights = [dequantize_packed(module.expert_projection("gate_up_proj", e)).double() for e in (1, 0)]
    expected = torch.cat([x[:1].double() @ weights[0].T, x[1:].double() @ weights[1].T])
    for portable in (False, True):
        y = cpu_moe.experts_gemm(x, seg_start, seg_expert, planes, module.expert_bits, 2 * INTER, G, portable)
        assert _relative(y, expected) < 1e-6, portable


@ZEROS
@pytest.mark.parametrize("rows", [1, 2, 5, 8, 9, 17])
def test_bf16_rows_at_every_width_equal_the_float64_reference(rows, integer_zeros):
    """bf16 activations in blocks of rows (prefill) or one row (decode): on CPUs with AVX-512 BF16
    they take bf16 dot products (codes as 1 + c/m, the offset taken out with the zero; in decode a
    1-bit plane by lookups), elsewhere the float path; both give the float64 product of the same
    bf16 values to float32 rounding, for every width."""
    module = _module(seed=rows, integer_zeros=integer_zeros)
    generator = torch.Generator().manual_seed(rows)
    for proj, (n, k) in (("gate_up_proj", (2 * INTER, H)), ("down_proj", (H, INTER))):
        planes = module.layout.kernel_planes(module._parameters, proj)
        x = torch.randn(rows * len(BITS), k, generator=generator).bfloat16()
        seg_start = torch.arange(0, rows * len(BITS) + 1, rows, dtype=torch.int32)
        seg_expert = torch.arange(len(BITS), dtype=torch.int32).flip(0)
        y = cpu_moe.experts_gemm(x, seg_start, seg_expert, planes, module.expert_bits, n, G)
        assert y.dtype == torch.float32 and y.shape == (rows * len(BITS), n)
        for block, expert in enumerate(seg_expert.tolist()):
            weight = dequantize_packed(module.expert_projection(proj, expert)).double()
            expected = x[block * rows : (block + 1) * rows].double() @ weight.T
            assert _relative(y[block * rows : (block + 1) * rows], expected) < 1e-5, (proj, BITS[expert])


@pytest.mark.parametrize("tokens", [3, 40])
def test_a_bf16_model_rounds_the_down_projections_input_to_bf16_on_every_path(tokens):
    """As transformers' dense experts and the Triton kernels do, SiLU(gate) * up reaches the down
    projection in the model's dtype: the CPU kernels (bf16 dot products of exact bf16 rows) and the
    torch reference both sit far closer to a float64 computation that rounds it than to one that
    does not (their distance to the latter is the rounding itself)."""
    module = _module(seed=tokens + 20)
    generator = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, H, generator=generator).bfloat16()
    top_k_index = torch.randint(0, len(BITS), (tokens, 2), generator=generator)
    top_k_weights = torch.softmax(torch.randn(tokens, 2, generator=generator), dim=-1)
    rounded = _expected_f64(module, x, top_k_index, top_k_weights, torch.bfloat16)
    exact = _expected_f64(module, x, top_k_index, top_k_weights)
    gate_up_planes = module.layout.kernel_planes(module._parameters, "gate_up_proj")
    down_planes = module.layout.kernel_planes(module._parameters, "down_proj")
    kernel = cpu_moe.silu_experts(x, top_k_index, top_k_weights, gate_up_planes, down_planes, module.expert_bits,
                                  INTER, G)  # fmt: skip
    module.kernel = "torch"
    reference = module(x.float(), top_k_index, top_k_weights)  # a float32 model
    reference_bf16 = module(x, top_k_index, top_k_weights)  # rounds its output to bf16 too
    assert kernel.dtype == torch.bfloat16  # rounded from its float32 sum, as the reference's .to() rounds
    assert _relative(kernel, rounded.bfloat16()) * 20 < _relative(kernel, exact.bfloat16())
    assert _relative(reference_bf16, rounded.bfloat16()) * 20 < _relative(reference_bf16, exact.bfloat16())
    assert _relative(reference, exact) < 1e-5  # keeping its float32 intermediate


@ZEROS
@pytest.mark.parametrize("variant", ["portable", "avx2"])
def test_the_builds_of_smaller_machines_compile_and_agree(variant, tmp_path, monkeypatch, integer_zeros):
    """Built as on a machine without AVX2 (plain C) or without AVX-512 (AVX2, 3-bit lookups at
    decode), every width gives the float64 result, one row (decode's lookups) and a block of five."""
    monkeypatch.setenv("MOEQ_CPU_KERNEL_CACHE", str(tmp_path))
    library = cpu_build.library(variant)
    assert library is not None and library.moeq_has_avx2() == (variant == "avx2")
    assert variant == "portable" or library.moeq_lut_bits() == 3
    module = _module(integer_zeros=integer_zeros)
    planes, bits = module.layout.kernel_planes(module._parameters, "down_proj"), module.expert_bits
    x = torch.randn(6, INTER, generator=torch.Generator().manual_seed(1))
    seg_start = torch.tensor([0, 1, 6], dtype=torch.int32)
    for expert in range(len(BITS)):
        seg_expert = torch.tensor([expert, len(BITS) - 1 - expert], dtype=torch.int32)
        weights = [dequantize_packed(module.expert_projection("down_proj", e)).double() for e in seg_expert.tolist()]
        expected = torch.cat([x[:1].double() @ weights[0].T, x[1:].double() @ weights[1].T])
        got = cpu_moe._gemm(x, seg_start, seg_expert, planes, bits, H, G, library=library)
        assert _relative(got, expected) < 1e-6, BITS[expert]


@pytest.mark.parametrize("tokens", [1, 3, 33])
def test_thread_count_does_not_change_the_result(tokens):
    """Decode-sized inputs cut the experts' outputs between threads by the bytes each reads (a cut
    can fall inside an expert of any width); prefill-sized ones deal whole row blocks out."""
    module = _module()
    generator = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, H, generator=generator)
    top_k_index = torch.randint(0, len(BITS), (tokens, 2), generator=generator)
    top_k_index[0] = torch.tensor([0, 7])  # widths 1 and 8 side by side: the cut falls inside the 8-bit one
    top_k_weights = torch.rand(tokens, 2, generator=generator)
    module.kernel = "cpu"
    threads = torch.get_num_threads()
    try:
        results = []
        for count in (1, 2, 3, 5):
            torch.set_num_threads(count)
            results.append(module(x, top_k_index, top_k_weights))
    finally:
        torch.set_num_threads(threads)
    expected = _expected_f64(module, x, top_k_index, top_k_weights)
    assert _relative(results[0], expected) < 1e-5
    for many in results[1:]:
        assert torch.equal(results[0], many)  # every output is summed by one thread, in one order


def test_pairs_routed_outside_the_experts_contribute_nothing():
    """-1 and E (experts held elsewhere, tokens dropped by capacity) are skipped, not read."""
    module = _module()
    x = torch.randn(4, H)
    top_k_index = torch.tensor([[0, -1], [len(BITS), 3], [-1, len(BITS)], [2, 5]])
    top_k_weights = torch.rand(4, 2)
    for kernel in ("cpu", "torch"):  # the compiled kernel and the reference
        module.kernel = kernel
        out = module(x, top_k_index, top_k_weights)
        assert torch.equal(out[2], torch.zeros(H)), kernel
        assert _relative(out, _expected_f64(module, x, top_k_index, top_k_weights)) < 1e-5, kernel


def test_the_kernel_reads_the_tensors_a_module_holds_now():
    """Address tables are cached by address: a module whose packed tensors are replaced (a new
    load, ``.to()``) is read from the new tensors, and a non-contiguous plane is refused."""
    module = _module([2, 3])
    x = torch.randn(3, H)
    top_k_index, top_k_weights = torch.tensor([[0, 1], [1, 0], [0, 1]]), torch.rand(3, 2)
    module.kernel = "cpu"
    module(x, top_k_index, top_k_weights)
    other = _module([2, 3], seed=7)
    for name, tensor in other.named_parameters():
        getattr(module, name).data = tensor.data.clone()  # new storage: new addresses
    assert _relative(module(x, top_k_index, top_k_weights), _expected_f64(other, x, top_k_index, top_k_weights)) < 1e-5
    planes = module.layout.kernel_planes(module._parameters, "gate_up_proj")
    planes[0] = planes[0].transpose(-1, -2).contiguous().transpose(-1, -2)  # same shape, other strides
    with pytest.raises(ValueError, match="contiguous"):
        cpu_moe.experts_gemm(x, torch.tensor([0, 3], dtype=torch.int32), torch.tensor([0], dtype=torch.int32),
                             planes, module.expert_bits, 2 * INTER, G)  # fmt: skip


def test_an_eager_forward_reuses_its_prepared_call_until_the_module_changes():
    """Eager CPU forwards of a module share one prepared kernel call (its address tables made
    once), which reads bf16 inputs, routing weights and outputs as they are; it is remade when a
    tensor is replaced by another object or ``kernel`` changes, and a module that has one still
    deep-copies."""
    import copy

    from optimum_moeq.nn.stored import _CPU_CALLS

    module = _module([2, 3])
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(4, H, generator=generator).bfloat16()
    top_k_index = torch.randint(0, 2, (4, 2), generator=generator)
    top_k_weights = torch.softmax(torch.randn(4, 2, generator=generator), dim=-1)
    out = module(x, top_k_index, top_k_weights.bfloat16())
    _, call = _CPU_CALLS[module]
    assert out.dtype == torch.bfloat16 and out.shape == (4, H)
    assert _relative(out, _expected_f64(module, x, top_k_index, top_k_weights.bfloat16(), torch.bfloat16)) < 5e-3
    # bf16 weights are read as the float32 weights they round to; int32 indices as int64
    same = module(x, top_k_index.int(), top_k_weights.bfloat16().float())
    assert torch.equal(out, same) and _CPU_CALLS[module][1] is call
    # float32 in, float32 out, through the same call
    assert module(x.float(), top_k_index, top_k_weights).dtype == torch.float32 and _CPU_CALLS[module][1] is call

    twin = copy.deepcopy(module)
    assert torch.equal(twin(x, top_k_index, top_k_weights), module(x, top_k_index, top_k_weights))
    other = _module([2, 3], seed=7)
    name = "gate_up_proj_b2_q2"
    setattr(module, name, torch.nn.Parameter(getattr(other, name).detach().clone(), requires_grad=False))
    replaced = module(x.float(), top_k_index, top_k_weights)
    assert _CPU_CALLS[module][1] is not call
    assert _relative(twin(x.float(), top_k_index, top_k_weights), replaced) > 1e-2  # the new codes are read
    module.kernel = "torch"
    assert _relative(module(x.float(), top_k_index, top_k_weights), replaced) < 1e-5
    module.kernel = "cpu"
    for dtype in (torch.float32, torch.bfloat16):  # no tokens: an empty result, not an error
        empty = module(x[:0].to(dtype), top_k_index[:0], top_k_weights[:0])
        assert empty.shape == (0, H) and empty.dtype == dtype
    getattr(module, name).data = getattr(module, name).data.mT.contiguous().mT  # same object, other strides
    with pytest.raises(ValueError, match="contiguous"):
        module(x, top_k_index, top_k_weights)


@ZEROS
def test_packed_linear_equals_its_dequantized_weight(integer_zeros):
    torch.manual_seed(1)
    linear = PackedLinear(H, 48, bits=3, group_size=G, bias=True, integer_zeros=integer_zeros)
    linear.store(linear.quantize_projection("weight", torch.randn(48, H)))
    torch.nn.init.normal_(linear.bias)
    x = torch.randn(2, 5, H)
    linear.kernel = "cpu"
    out = linear(x)
    expected = x.double() @ linear.dequantized().double().T + linear.bias.double()
    assert out.shape == (2, 5, 48) and _relative(out, expected) < 1e-6
    # a bf16 model's rows: the prepared call reads and writes bf16 itself, and rounds as the general
    # path's float32 result rounds through .to()
    from optimum_moeq.nn.stored import _CPU_CALLS

    rows = x.bfloat16()
    general = cpu_moe.linear_forward(rows, linear.layout, linear._parameters)
    assert torch.equal(linear(rows), general + linear.bias.to(torch.bfloat16))
    assert isinstance(_CPU_CALLS[linear][1], cpu_moe.LinearCall) and general.dtype == torch.bfloat16
    assert _relative(general, rows.double() @ linear.dequantized().double().T) < 5e-3
    for dtype in (torch.float32, torch.bfloat16):
        assert linear(x[:, :0].to(dtype)).shape == (2, 0, 48)


def test_auto_takes_the_cpu_kernels_and_a_model_gives_the_reference_logits(tmp_path):
    torch.manual_seed(0)
    MixtralForCausalLM(tiny_mixtral_config()).save_pretrained(tmp_path)
    config = RouterNormConfig(avg_bits=2.5, group_size=32, method="rtn", attention_bits=4)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=config)
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        fast = model(ids).logits
        packed = [m for m in model.modules() if isinstance(m, (MixedBitExperts, PackedLinear))]
        assert packed and all(m._use_cpu_kernels(ids.float()) for m in packed)
        for m in packed:
            m.kernel = "torch"
        reference = model(ids).logits
    assert _relative(fast, reference) < 1e-5


def test_kernel_cpu_names_what_it_cannot_run():
    module = MixedBitExperts([2, 3], hidden_dim=64, intermediate_dim=96, group_size=16)
    module.kernel = "cpu"
    with pytest.raises(ValueError, match="kernel='cpu' needs CPU inputs .* multiple of 32 \\(got 16\\)"):
        module(torch.randn(1, 64), torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1))


def test_without_a_compiler_the_reference_runs_after_one_warning(tmp_path, monkeypatch):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("MOEQ_CPU_KERNEL_CACHE", str(tmp_path / "cache"))
    cpu_build.library.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="CPU kernels are unavailable .*no C compiler found"):
            assert cpu_build.library() is None
        module = _module([2, 3])
        x, index, weights = torch.randn(3, H), torch.tensor([[0, 1], [1, 0], [0, 1]]), torch.rand(3, 2)
        assert not module._use_cpu_kernels(x)
        assert _relative(module(x, index, weights), _expected_f64(module, x, index, weights)) < 1e-5
    finally:
        cpu_build.library.cache_clear()


@pytest.mark.parametrize("gated, activation", [(False, "relu"), (True, "gelu")])
def test_other_activations_run_the_two_projections_and_equal_the_reference(gated, activation):
    """Only SiLU-gated experts take the fused call; the rest compute the activation in torch."""
    torch.manual_seed(2)
    module = MixedBitExperts([2, 3, 4], hidden_dim=H, intermediate_dim=INTER, group_size=G, hidden_act=activation,
                             gated=gated)  # fmt: skip
    for proj, (e, n, k) in module.projection_shapes.items():
        module.store(module.quantize_projection(proj, torch.randn(e, n, k) * 0.05))
    x, index, weights = torch.randn(6, H), torch.randint(0, 3, (6, 1)), torch.rand(6, 1)
    module.kernel = "cpu"
    fast = module(x, index, weights)
    module.kernel = "torch"
    assert _relative(fast, module(x.double().float(), index, weights)) < 1e-5


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 1e-3)])
def test_logits_equal_the_reference_path_at_every_width(tmp_path, dtype, tolerance):
    """Every expert at one width, 1 to 8 bits: the issue's bound, in fp32 and in bf16 (both paths
    compute the experts in float32 from the exact weights; only the order of the sums differs), for
    a prompt (prefill) and for one token (decode: one row an expert)."""
    torch.manual_seed(0)
    MixtralForCausalLM(tiny_mixtral_config()).save_pretrained(tmp_path)
    ids = torch.randint(0, 128, (1, 10))
    errors = {}
    for bits in BITS:
        levels = (bits, bits + 1) if bits < 8 else (bits - 1, bits)
        config = RouterNormConfig(avg_bits=float(bits), bit_levels=levels, group_size=32, method="rtn")
        model = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=config, dtype=dtype)
        experts = [m for m in model.modules() if isinstance(m, MixedBitExperts)]
        assert all(m.expert_bits == [bits] * 8 for m in experts)
        with torch.no_grad():
            fast = [model(inputs).logits for inputs in (ids, ids[:, :1])]
            for m in experts:
                m.kernel = "torch"
            errors[bits] = max(_relative(model(inputs).logits, f) for inputs, f in zip((ids, ids[:, :1]), fast))
    assert max(errors.values()) < tolerance, errors


def test_a_model_on_the_cpu_kernels_compiles_whole(tiny_mixtral_path):
    """The kernels are custom ops: torch.compile(fullgraph=True) traces the model around them."""
    torch._dynamo.reset()
    config = RouterNormConfig(method="rtn", group_size=32, attention_bits=4)
    model = AutoModelForCausalLM.from_pretrained(tiny_mixtral_path, quantization_config=config)
    tokens = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(tokens).logits
        logits = torch.compile(model, backend="aot_eager", fullgraph=True)(tokens).logits
    assert _relative(logits, expected) < 1e-6
