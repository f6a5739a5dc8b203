"""Triton kernels against the float32 torch reference: CPU through TRITON_INTERPRET=1, and the
same checks at real Mixtral sizes when a GPU is present."""

import functools

import pytest
import torch

pytest.importorskip("triton")

from optimum_moeq.kernels.routing import align_pairs_by_expert  # noqa: E402
from optimum_moeq.kernels.tuning import KernelTuning, current_tuning, kernel_tuning  # noqa: E402
from optimum_moeq.nn import MixedBitExperts  # noqa: E402
from optimum_moeq.nn.linear import triton_linear_forward  # noqa: E402
from optimum_moeq.quant.synthetic import random_packed_projection  # noqa: E402

TOLERANCE = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
GPU_TOLERANCE = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def _triton_linear(linear, x):
    """A PackedLinear's product by the Triton kernels, without its bias."""
    return triton_linear_forward(x, linear.layout, linear._parameters)


def _experts(bits, hidden, intermediate, group_size, device="cpu", seed=0, integer_zeros=False, **module_kwargs):
    generator = torch.Generator().manual_seed(seed)
    module = MixedBitExperts(bits, hidden, intermediate, group_size, integer_zeros=integer_zeros, **module_kwargs)
    with torch.no_grad():
        for proj, (n, k) in module.layout.projections.items():
            for b, members in module.layout.members.items():
                packed = random_packed_projection(len(members), n, k, b, group_size, generator=generator,
                                                  integer_zeros=integer_zeros)  # fmt: skip
                module.store_packed(proj, packed)
    return module.to(device)


def _routing(tokens, num_experts, top_k, skip_expert, generator):
    choices = [e for e in range(num_experts) if e != skip_expert]
    index = torch.stack([torch.tensor(choices)[torch.randperm(len(choices), generator=generator)[:top_k]]
                         for _ in range(tokens)])  # fmt: skip
    weights = torch.softmax(torch.randn(tokens, top_k, generator=generator), dim=-1)
    return index, weights


def _relative_error(module, x, index, weights):
    module.kernel = "torch"
    reference = module(x.float(), index, weights)
    module.kernel = "triton"
    out = module(x, index, weights)
    assert out.shape == x.shape and out.dtype == x.dtype
    return ((out.float() - reference).norm() / reference.norm()).item()


@pytest.mark.parametrize("integer_zeros", [False, True], ids=["float_zeros", "integer_zeros"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 3, 37])  # decode (GEMV, split-K) and prefill (tl.dot) paths
def test_mixed_bit_layer_matches_reference_on_cpu(dtype, tokens, integer_zeros):
    generator = torch.Generator().manual_seed(tokens)
    module = _experts([2, 3, 4, 3, 1, 5, 8, 2], hidden=64, intermediate=96, group_size=32,
                      integer_zeros=integer_zeros)  # fmt: skip
    index, weights = _routing(tokens, 8, 2, skip_expert=6, generator=generator)  # expert 6: no token
    x = torch.randn(tokens, 64, generator=generator).to(dtype)
    assert (tokens * 2 <= current_tuning().decode_max_pairs) == (tokens < 37)
    assert _relative_error(module, x, index, weights) < TOLERANCE[dtype]


@pytest.mark.parametrize(
    "changes",
    [
        dict(gemv_block_n=32, target_programs=8, gemv_warps=2),  # narrower tiles, less split-K
        dict(gemv_block_n=128, target_programs=1 << 20),  # wider than the output: masked columns, most split-K
        dict(decode_max_pairs=1, gemm_block_m_small=32, gemm_block_n=32, gemm_stages=2),  # tl.dot from 3 tokens
        dict(decode_max_pairs=1, gemm_block_m=16, gemm_block_m_small=16, gemm_block_n=128, gemm_warps=8),
    ],
)
def test_other_launch_parameters_give_the_same_result(changes, monkeypatch):
    """What `benchmarks/expert_kernels.py --sweep` may pick on a GPU must be correct: same check, other tiles."""
    import optimum_moeq.kernels.grouped as grouped

    block_rows = []
    align = grouped.align_pairs_by_expert
    monkeypatch.setattr(grouped, "align_pairs_by_expert", lambda *a: block_rows.append(a[-1]) or align(*a))
    generator = torch.Generator().manual_seed(1)
    module = _experts([2, 3, 4, 3, 1, 5, 8, 2], hidden=64, intermediate=96, group_size=32)
    for tokens in (3, 37):
        index, weights = _routing(tokens, 8, 2, skip_expert=6, generator=generator)
        x = torch.randn(tokens, 64, generator=generator).to(torch.float16)
        with kernel_tuning(**changes):
            assert _relative_error(module, x, index, weights) < TOLERANCE[torch.float16]
    tuning = KernelTuning(**changes)
    expected = [tuning.gemm_block_m_small] * (6 > tuning.decode_max_pairs) + [tuning.gemm_block_m]  # 6, 74 pairs
    assert block_rows == expected  # the tiles asked for are the ones launched
    assert current_tuning() == KernelTuning()  # restored on exit


def test_bad_launch_parameters_name_the_value_and_what_is_allowed():
    with pytest.raises(ValueError, match=r"gemm_block_n=48: must be a power of two from 16 to 256"):
        with kernel_tuning(gemm_block_n=48):
            pass
    with pytest.raises(ValueError, match=r"unknown kernel parameters \['block_n'\]; known: \['decode_max_pairs'"):
        with kernel_tuning(block_n=64):
            pass
    assert current_tuning() == KernelTuning()


@pytest.mark.parametrize("tokens", [3, 40])  # decode (GEMV) and prefill (tl.dot)
@pytest.mark.parametrize("outside", [-1, 4, 9])  # a dropped token, an expert on another rank, a bad id
def test_expert_ids_outside_the_layer_contribute_nothing(tokens, outside):
    generator = torch.Generator().manual_seed(tokens - outside)
    module = _experts([2, 3, 3, 2], hidden=32, intermediate=64, group_size=16)
    index = torch.randint(0, 4, (tokens, 2), generator=generator)
    index[::3, 1] = outside
    weights = torch.rand(tokens, 2, generator=generator)
    x = torch.randn(tokens, 32, generator=generator)
    # the reference: those pairs routed to expert 0 with weight 0
    inside = (index >= 0) & (index < 4)
    module.kernel = "torch"
    expected = module(x, torch.where(inside, index, 0), torch.where(inside, weights, 0.0))
    module.kernel = "triton"
    out = module(x, index, weights)
    assert ((out - expected).norm() / expected.norm()).item() < 1e-5


def test_align_pairs_by_expert_blocks_hold_one_expert_each():
    index = torch.tensor([[0, 3], [3, 1], [0, 3], [5, 0], [3, 0], [0, 1]])
    blocks = align_pairs_by_expert(index, num_experts=6, block_m=4)
    flat = index.reshape(-1)
    rows = blocks.sorted_pairs.view(-1, 4)
    seen = []
    for row, expert in zip(rows.tolist(), blocks.block_expert.tolist()):
        pairs = [p for p in row if p < blocks.num_pairs]
        if expert < 0:
            assert not pairs
        seen += pairs
        assert all(flat[p].item() == expert for p in pairs)
    assert sorted(seen) == list(range(flat.numel()))
    assert blocks.block_expert.tolist()[:5] == [0, 0, 1, 3, 5]  # expert 0's 5 pairs take two blocks


def test_triton_kernel_refuses_a_group_size_it_cannot_tile():
    module = MixedBitExperts([2, 2], hidden_dim=32, intermediate_dim=32, group_size=8)
    module.kernel = "triton"
    with pytest.raises(ValueError, match="group_size=8"):
        module(torch.randn(1, 32), torch.tensor([[0]]), torch.ones(1, 1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="real-size kernel checks need a GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])  # float32: no TF32
@pytest.mark.parametrize("tokens", [1, 16, 512])
def test_mixtral_sized_layer_matches_reference_on_gpu(dtype, tokens):
    generator = torch.Generator().manual_seed(tokens)
    bits = [3, 2, 3, 2, 3, 2, 3, 2]
    module = _experts(bits, hidden=4096, intermediate=14336, group_size=128, device="cuda")
    index, weights = _routing(tokens, 8, 2, skip_expert=7 if tokens < 512 else -1, generator=generator)
    x = torch.randn(tokens, 4096, generator=generator).to(dtype)
    error = _relative_error(module, x.cuda(), index.cuda(), weights.cuda())
    assert error < GPU_TOLERANCE[dtype]


def test_quantized_model_runs_through_the_kernels_unchanged(tiny_mixtral_path):
    from transformers import AutoModelForCausalLM

    from optimum_moeq import RouterNormConfig

    model = AutoModelForCausalLM.from_pretrained(
        tiny_mixtral_path, quantization_config=RouterNormConfig(method="rtn", group_size=32)
    )
    tokens = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(tokens).logits
        for module in model.modules():
            if isinstance(module, MixedBitExperts):
                module.kernel = "triton"
        logits = model(tokens).logits
    assert ((logits - reference).norm() / reference.norm()) < 1e-5


@pytest.mark.parametrize("integer_zeros", [False, True], ids=["float_zeros", "integer_zeros"])
@pytest.mark.parametrize("rows", [5, 70])  # GEMV (split-K) and tl.dot paths
def test_packed_linear_kernel_path_matches_reference(rows, integer_zeros):
    from optimum_moeq.nn import PackedLinear

    generator = torch.Generator().manual_seed(rows)
    linear = PackedLinear(64, 48, bits=4, group_size=32, bias=True, integer_zeros=integer_zeros)
    with torch.no_grad():
        weight = torch.randn(48, 64, generator=generator) * 0.05
        linear.store(linear.quantize_projection("weight", weight))
        linear.bias.copy_(torch.randn(48, generator=generator))
    x = torch.randn(rows, 64, generator=generator)
    reference = linear(x)  # CPU tensors: the torch reference
    out = _triton_linear(linear, x) + linear.bias
    assert ((out - reference).norm() / reference.norm()) < 1e-5
    index = linear.layout.local_index(4, x.device)
    assert index.tolist() == [0, -1]
    _triton_linear(linear, x)
    assert linear.layout.local_index(4, x.device) is index  # made once per device, not in every forward
    with kernel_tuning(decode_max_pairs=1, gemm_block_m=16):  # the shared launch parameters apply here too
        out = _triton_linear(linear, x) + linear.bias
    assert ((out - reference).norm() / reference.norm()) < 1e-5


def test_float32_prefill_dot_is_exact_unless_torch_allows_tf32():
    from optimum_moeq.kernels.grouped import dot_input_precision

    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert dot_input_precision(torch.float32) == "ieee"
        torch.set_float32_matmul_precision("high")
        assert dot_input_precision(torch.float32) == "tf32"
    finally:
        torch.set_float32_matmul_precision(previous)
    assert dot_input_precision(torch.bfloat16) == dot_input_precision(torch.float16) == "tf32"  # 16-bit: unused


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_ungated_experts_decode_in_16_bit_without_split_k_errors(dtype):
    """Switch-style experts (up, relu, down: no fused SiLU) at decode: the activation buffer has
    the input's dtype, so the up projection must not split K into it."""
    generator = torch.Generator().manual_seed(0)
    module = _experts([2, 3, 3, 2], 64, 512, 32, hidden_act="relu", gated=False)
    index, weights = _routing(1, 4, 1, skip_expert=-1, generator=generator)
    x = torch.randn(1, 64, generator=generator).to(dtype)
    assert _relative_error(module, x, index, weights) < TOLERANCE[dtype]


def test_experts_held_elsewhere_are_skipped_at_prefill_too():
    """Index num_experts (an expert on another rank) gets unused blocks, never a row of an expert."""
    generator = torch.Generator().manual_seed(2)
    module = _experts([2, 3, 3, 2], hidden=32, intermediate=64, group_size=16)
    index = torch.randint(0, 5, (40, 2), generator=generator)  # about a fifth held elsewhere
    weights = torch.rand(40, 2, generator=generator)
    assert 40 * 2 > current_tuning().decode_max_pairs and (index == 4).any()
    assert _relative_error(module, torch.randn(40, 32, generator=generator), index, weights) < 1e-5
    blocks = align_pairs_by_expert(index, num_experts=4, block_m=16)
    flat = index.reshape(-1)
    rows = blocks.sorted_pairs.view(-1, 16)[blocks.block_expert >= 0]
    placed = rows[rows < blocks.num_pairs]
    assert sorted(placed.tolist()) == sorted(torch.nonzero(flat < 4).flatten().tolist())


def _graph_ops(compiled_graphs):
    return [str(node.target) for gm in compiled_graphs for node in gm.graph.nodes if node.op == "call_function"]


@pytest.mark.parametrize("tokens", [1, 37])  # GEMV and tl.dot paths
@pytest.mark.parametrize("gated", [True, False])
def test_triton_path_compiles_into_one_graph_with_one_op_per_projection(tokens, gated):
    """torch.compile(fullgraph=True) traces the experts with no graph break: the launches of a
    projection reach it as the custom op moeq::mixed_bit_projection, the routing as plain torch."""
    torch._dynamo.reset()
    generator = torch.Generator().manual_seed(tokens)
    kind = dict(hidden_act="silu") if gated else dict(hidden_act="relu", gated=False)  # fused SiLU, or not
    module = _experts([2, 3, 4, 3, 1, 5, 8, 2], hidden=64, intermediate=96, group_size=32, **kind)
    module.kernel = "triton"
    index, weights = _routing(tokens, module.num_experts, 2, skip_expert=1, generator=generator)
    x = torch.randn(tokens, 64, generator=generator)
    expected = module(x, index, weights)
    graphs = []
    compiled = torch.compile(module, fullgraph=True, backend=lambda gm, _: graphs.append(gm) or gm.forward)
    assert torch.equal(compiled(x, index, weights), expected)
    assert sum("mixed_bit_projection" in op for op in _graph_ops(graphs)) == 2  # gate_up (or up), down


@pytest.mark.parametrize("rows", [5, 70])
def test_packed_linear_kernel_path_compiles_into_one_graph(rows):
    from optimum_moeq.nn import PackedLinear

    torch._dynamo.reset()
    generator = torch.Generator().manual_seed(rows)
    linear = PackedLinear(64, 48, bits=3, group_size=32)
    with torch.no_grad():
        linear.store(linear.quantize_projection("weight", torch.randn(48, 64, generator=generator)))
    x = torch.randn(rows, 64, generator=generator)
    graphs = []
    compiled = torch.compile(
        functools.partial(_triton_linear, linear), fullgraph=True, backend=lambda gm, _: graphs.append(gm) or gm
    )
    assert torch.equal(compiled(x), _triton_linear(linear, x))
    assert sum("mixed_bit_projection" in op for op in _graph_ops(graphs)) == 1


def test_mixed_bit_projection_op_passes_torch_library_checks(monkeypatch):
    """Schema, fake (meta) implementation and AOT dispatch of the custom op, with the arguments the
    experts module gives it when compiling (decode and prefill)."""
    import optimum_moeq.kernels.grouped as grouped

    op = torch.ops.moeq.mixed_bit_projection.default
    calls = []
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    monkeypatch.setattr(grouped, "_mixed_bit_projection_op", lambda *args: calls.append(args) or op(*args))
    module = _experts([2, 3, 3, 2], hidden=32, intermediate=64, group_size=16)
    module.kernel = "triton"
    generator = torch.Generator().manual_seed(0)
    for tokens in (3, 20):
        index, weights = _routing(tokens, 4, 2, skip_expert=1, generator=generator)
        module(torch.randn(tokens, 32, generator=generator), index, weights)
    assert len(calls) == 4 and calls[-1][3] is not None  # the prefill calls carry sorted pairs
    for args in calls:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_quantized_model_compiles_whole(tiny_mixtral_path):
    """A loaded model (Triton experts, packed attention) compiles with fullgraph=True and gives the
    eager logits, and tells generate() that it may be compiled."""
    from transformers import AutoModelForCausalLM

    from optimum_moeq import RouterNormConfig

    torch._dynamo.reset()
    config = RouterNormConfig(method="rtn", group_size=32, attention_bits=4)
    model = AutoModelForCausalLM.from_pretrained(tiny_mixtral_path, quantization_config=config)
    assert model.hf_quantizer.is_compileable
    for module in model.modules():
        if isinstance(module, MixedBitExperts):
            module.kernel = "triton"
    tokens = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(tokens).logits
        logits = torch.compile(model, backend="aot_eager", fullgraph=True)(tokens).logits
    assert torch.equal(logits, expected)


needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA-graph and sync checks need a GPU")


@needs_gpu
@pytest.mark.parametrize("tokens", [1, 16, 200])
def test_gpu_forward_never_syncs_with_the_host_and_replays_in_a_cuda_graph(tokens):
    """A step that reads a device value back on the host cannot be captured, and stalls decode."""
    generator = torch.Generator().manual_seed(tokens)
    module = _experts([3, 2, 3, 2, 3, 2, 3, 2], hidden=1024, intermediate=2048, group_size=128, device="cuda")
    module.kernel = "triton"
    inputs = [t.cuda() for t in (torch.randn(tokens, 1024, generator=generator).to(torch.bfloat16),
                                 *_routing(tokens, 8, 2, skip_expert=-1, generator=generator))]  # fmt: skip
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up (Triton compiles) off the capture stream, as torch advises
        module(*inputs)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.set_sync_debug_mode("error")
    try:
        module(*inputs)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = module(*inputs)
    fresh = [torch.randn(tokens, 1024, generator=generator).to(torch.bfloat16),
             *_routing(tokens, 8, 2, skip_expert=-1, generator=generator)]  # fmt: skip
    for static, new in zip(inputs, fresh):
        static.copy_(new)
    graph.replay()
    eager = module(*inputs)  # split-K adds partial sums atomically, in any order: equal up to rounding
    assert ((captured.float() - eager.float()).norm() / eager.float().norm()) < 1e-3


@needs_gpu
def test_gpu_generate_with_static_cache_compiles_and_matches_eager(tiny_mixtral_path):
    """generate() compiles a static-cache decode (CUDA graphs included) for this quantizer; the
    tokens equal those of the uncompiled dynamic-cache decode."""
    from transformers import AutoModelForCausalLM

    from optimum_moeq import RouterNormConfig

    torch._dynamo.reset()
    config = RouterNormConfig(method="rtn", group_size=32, attention_bits=4)
    model = AutoModelForCausalLM.from_pretrained(tiny_mixtral_path, quantization_config=config, device_map="cuda")
    prompt = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0)).cuda()
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, return_dict_in_generate=True, output_logits=True)
    eager = model.generate(prompt, **kwargs)
    compiled = model.generate(prompt, cache_implementation="static", **kwargs)
    assert hasattr(model, "_compiled_call")  # where transformers keeps the forward it compiled
    for step, (ours, theirs) in enumerate(zip(compiled.logits, eager.logits)):
        assert ((ours - theirs).norm() / theirs.norm()) < 1e-3, step
        top2 = theirs.float().topk(2).values
        if not torch.equal(ours.argmax(-1), theirs.argmax(-1)):  # only a near-tie may pick another token
            assert (top2[:, 0] - top2[:, 1]).min() < 1e-3, step
            break


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_a_layer_on_the_second_gpu_launches_there():
    """Triton launches on the current device unless told otherwise (triton-lang/triton#5205)."""
    generator = torch.Generator().manual_seed(5)
    module = _experts([3, 2, 3, 2], hidden=256, intermediate=512, group_size=128)
    index = torch.randint(0, 4, (40, 2), generator=generator)
    weights, x = torch.rand(40, 2, generator=generator), torch.randn(40, 256, generator=generator)
    module.kernel = "torch"
    expected = module(x, index, weights)
    module.to("cuda:1").kernel = "triton"
    for tokens in (1, 40):  # decode and prefill
        with torch.cuda.device(0):
            out = module(x[:tokens].to("cuda:1"), index[:tokens].to("cuda:1"), weights[:tokens].to("cuda:1"))
        assert out.device == torch.device("cuda:1")
        assert ((out.cpu() - expected[:tokens]).norm() / expected[:tokens].norm()).item() < 1e-4
