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
            module.store(module.quantize_projection(proj, weight))
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


@pytest.mark.parametrize("attention", [dict(attention_bits=4), dict(attention_method="bnb_nf4")])
def test_dtype_casts_move_but_never_recast_the_stored_tensors(tiny_mixtral_path, tmp_path, attention):
    """model.to(bfloat16) casts the rest of the model; codes, scales, zeros and absmax keep their
    values and dtypes (a cast would change the weights the codes were chosen for, and be saved)."""
    from transformers import AutoModelForCausalLM

    from optimum_moeq import RouterNormConfig
    from optimum_moeq.nn import QUANTIZED_DENSE

    if "attention_method" in attention:
        pytest.importorskip("bitsandbytes")
    config = RouterNormConfig(method="rtn", group_size=32, **attention)
    model = AutoModelForCausalLM.from_pretrained(tiny_mixtral_path, quantization_config=config)
    quantized = [m for m in model.modules() if isinstance(m, (MixedBitExperts, *QUANTIZED_DENSE))]
    stored = {(id(m), n): p.detach().clone() for m in quantized for n, p in m.named_parameters() if n != "bias"}
    assert any(t.dtype == torch.float16 for t in stored.values()) and any(
        t.is_floating_point() for t in stored.values()
    )
    for dtype in (torch.bfloat16, torch.float32):
        model.to(dtype)
        assert model.model.embed_tokens.weight.dtype == dtype  # the rest follows the cast
        for (module_id, name), before in stored.items():
            module = next(m for m in quantized if id(m) == module_id)
            after = getattr(module, name)
            assert after.dtype == before.dtype and torch.equal(after, before), name
    model.to(torch.bfloat16).save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    reloaded_params = dict(reloaded.named_parameters())
    for name, param in model.named_parameters():
        if name.endswith(("_scale", "_zero", "_absmax")):
            assert reloaded_params[name].dtype == param.dtype != torch.bfloat16 and torch.equal(
                reloaded_params[name], param
            )
