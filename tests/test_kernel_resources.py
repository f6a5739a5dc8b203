"""The kernels compiled for an H100 (sm_90) on this machine, no GPU needed: every launch the
experts make at decode and prefill fits the GPU's shared memory, and the default tiles do not
spill. (A prefill tile that needed 329 KB of the H100's 227 KB was found this way.)"""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton.backends.nvidia.compiler")

PROBE = """
import json, torch
from optimum_moeq.kernels.resources import SHARED_MEMORY_LIMIT, compile_for, record_launches, resources_of
from optimum_moeq.nn import MixedBitExperts

generator = torch.Generator().manual_seed(0)
# bf16 at decode (GEMV) and prefill (tl.dot), gated (fused SiLU) or not, float16 zeros; the gated ones
# with integer zeros too (format 2); fp32 at prefill (exact dot)
cases = [(torch.bfloat16, gated, tokens, False) for gated in (True, False) for tokens in (1, 100)]
cases += [(torch.bfloat16, True, tokens, True) for tokens in (1, 100)] + [(torch.float32, True, 100, False)]
for dtype, gated, tokens, integer_zeros in cases:
    module = MixedBitExperts([3, 8, 2, 3], 256, 512, 128, hidden_act="silu" if gated else "relu", gated=gated,
                             integer_zeros=integer_zeros)
    module.kernel = "triton"  # the weights stay uninitialised: nothing runs
    index = torch.randint(0, 4, (tokens, 2), generator=generator)
    x = torch.randn(tokens, 256, generator=generator).to(dtype)
    for launch in record_launches(lambda: module(x, index, torch.rand(tokens, 2))):
        compiled = compile_for(launch, 90)
        found = resources_of(compiled, 90)
        bits = launch.kwargs["N2"] * 2 + launch.kwargs["HAS_Q1"]
        print(json.dumps(dict(kernel=launch.name, dtype=str(dtype), gated=gated, bits=bits, shared=found.shared_bytes,
                              integer_zeros=integer_zeros,
                              limit=SHARED_MEMORY_LIMIT[90], registers=found.registers, spills=found.spill_bytes,
                              fp_fusion=compiled.metadata.enable_fp_fusion)))

# the dp4a decode kernel (opt-in): SASS instructions of its K loop per weight a thread decodes
from optimum_moeq.kernels.tuning import kernel_tuning
module = MixedBitExperts([2, 3], 256, 512, 128)
module.kernel = "triton"
for digits in (1, 2):
    with kernel_tuning(gemv_kernel="dp4a", activation_digits=digits):
        x = torch.randn(1, 256, generator=generator).to(torch.bfloat16)
        launches = record_launches(lambda: module(x, torch.tensor([[0, 1]]), torch.rand(1, 2)))
    for launch in launches:
        c = launch.kwargs
        if "N2" not in c:  # the activations' quantization, not a weights loop
            continue
        found = resources_of(compile_for(launch, 90), 90)
        per_thread = c["BLOCK_K"] * c["BLOCK_N"] * (2 if c["GATE_AND_UP"] else 1) / (c["num_warps"] * 32)
        print(json.dumps(dict(kernel=launch.name, dtype="dp4a", gated=c["GATE_AND_UP"], bits=c["N2"] * 2 + c["HAS_Q1"],
                              digits=digits, shared=found.shared_bytes, limit=SHARED_MEMORY_LIMIT[90],
                              registers=found.registers, spills=found.spill_bytes, fp_fusion=True,
                              per_weight=found.loop_instructions / per_thread)))
"""


@pytest.fixture(scope="module")
def compiled_launches():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def test_every_launch_is_compiled(compiled_launches):
    compiled_launches = [r for r in compiled_launches if r["dtype"] != "dp4a"]
    kinds = {(r["kernel"], r["dtype"], r["gated"], r["bits"], r["integer_zeros"]) for r in compiled_launches}
    # bf16: GEMV and tl.dot, gated or not, and gated with integer zeros; fp32 tl.dot; 2/3/8 bits
    assert len(kinds) == (2 * 2 + 2 + 1) * 3
    assert len(compiled_launches) == 2 * len(kinds)  # two projections each


def test_every_launch_fits_an_h100s_shared_memory(compiled_launches):
    too_big = [r for r in compiled_launches if r["shared"] > r["limit"]]
    assert not too_big


def test_16_bit_launches_do_not_spill(compiled_launches):
    spilling = [r for r in compiled_launches if r["spills"] and r["dtype"] == "torch.bfloat16"]
    assert not spilling


def test_every_launch_compiles_with_fp_fusion_pinned_on(compiled_launches):
    """Triton's default changed (off from 3.10): the launches and the offline compile pin it."""
    assert {r["fp_fusion"] for r in compiled_launches} == {True}


def test_dp4a_decode_loop_meets_the_instruction_budget(compiled_launches):
    """Offline sm_90, the K loop of the dp4a decode GEMV per weight a thread decodes: issue 16's budget,
    1.6 at 2 bits and 2.5 at 3 bits, with int8 activations (measured 0.96-1.06 and 1.84-2.08); two
    digits cost more (1.32-1.42 and 2.58-2.60), held to their measured figures with a little room."""
    budget = {(1, 2): 1.6, (1, 3): 2.5, (2, 2): 1.6, (2, 3): 2.8}
    dp4a = [r for r in compiled_launches if r["dtype"] == "dp4a"]
    assert len(dp4a) == 2 * 2 * 2  # digits x widths x projections
    over = [r for r in dp4a if r["per_weight"] > budget[(r["digits"], r["bits"])] or r["spills"]]
    assert not over, over


def test_pipe_cycles_count_each_pipe_at_its_rate():
    from optimum_moeq.kernels.resources import pipe_cycles

    cycles = pipe_cycles(["LOP3", "SHF", "IDP", "IMAD", "FFMA", "I2FP", "LDG", "BAR"])
    assert cycles == {"issue": 8.0, "alu": 4.0, "fma_heavy": 4.0, "fma": 1.0, "convert": 8.0}
