import pytest
import torch

from optimum_moeq.nn import MixedBitExperts
from optimum_moeq.quant import quantize_rtn

E, H, INTER, G = 6, 64, 96, 32


def _dequantized_f64(weight, bits):
    q = quantize_rtn(weight, bits, G)
    s = q.scale.double().repeat_interleave(G, dim=-1)
    z = q.zero.double().repeat_interleave(G, dim=-1)
    return (q.codes.double() - z) * s


@pytest.fixture
def module_and_weights():
    torch.manual_seed(0)
    bits = [2, 3, 4, 3, 2, 8]
    gate_up = torch.randn(E, 2 * INTER, H) * 0.05
    down = torch.randn(E, H, INTER) * 0.05
    module = MixedBitExperts(bits, hidden_dim=H, intermediate_dim=INTER, group_size=G, method="rtn")
    with torch.no_grad():
        for proj, weight in (("gate_up_proj", gate_up), ("down_proj", down)):
            for name, tensor in module.quantize_projection(proj, weight).items():
                getattr(module, name).copy_(tensor)
    return module, bits, gate_up, down


def test_forward_matches_a_float64_loop_over_dequantized_experts(module_and_weights):
    module, bits, gate_up, down = module_and_weights
    tokens = 7  # odd count; expert 4 receives no token
    x = torch.randn(tokens, H)
    top_k_index = torch.tensor([[0, 1], [2, 3], [5, 0], [1, 2], [3, 5], [0, 2], [1, 5]])
    top_k_weights = torch.softmax(torch.randn(tokens, 2), dim=-1)
    out = module(x, top_k_index, top_k_weights)

    expected = torch.zeros(tokens, H, dtype=torch.float64)
    for t in range(tokens):
        for k in range(2):
            e = top_k_index[t, k].item()
            gu = _dequantized_f64(gate_up[e], bits[e]) @ x[t].double()
            h = torch.nn.functional.silu(gu[:INTER]) * gu[INTER:]
            expected[t] += top_k_weights[t, k].double() * (_dequantized_f64(down[e], bits[e]) @ h)
    assert out.dtype == torch.float32 and out.shape == (tokens, H)
    assert torch.allclose(out.double(), expected, atol=1e-5, rtol=1e-4)


def test_parameters_hold_each_width_in_one_tensor(module_and_weights):
    module, bits, _, _ = module_and_weights
    assert module.gate_up_proj_b3_q2.shape == (2, 1, H // 16, 2 * INTER)  # experts 1 and 3
    assert module.gate_up_proj_b3_q1.shape == (2, H // 32, 2 * INTER)
    assert module.down_proj_b8_q2.shape == (1, 4, INTER // 16, H)
    assert not hasattr(module, "gate_up_proj_b2_q1")
    assert module.down_proj_b2_scale.shape == (2, INTER // G, H)
    assert "2x2-bit, 2x3-bit, 1x4-bit, 1x8-bit" in repr(module)


def test_input_dimension_that_cannot_pack_is_named():
    with pytest.raises(ValueError, match=r"layer\.down_proj has input dimension 48.*multiple of 32"):
        MixedBitExperts([3, 2], hidden_dim=64, intermediate_dim=48, group_size=16, name="layer")
