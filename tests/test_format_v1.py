"""Checkpoints saved in format version 1 by an earlier optimum-moeq reload bit-identically.

tests/data/format_v1 was written by the code before the experts-layout refactor
(tests/data/make_format_v1.py says how): every packed tensor must load as stored, save back to the
same bytes, and give the logits it gave then."""

from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from optimum_moeq.kernels.reference import dequantize_packed
from optimum_moeq.nn import MixedBitExperts, PackedLinear

FIXTURE = Path(__file__).parent / "data" / "format_v1"


def _stored(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


def test_packed_tensors_load_as_stored():
    model = AutoModelForCausalLM.from_pretrained(FIXTURE)
    stored = _stored(FIXTURE)
    # transformers saves Mixtral's experts under the checkpoint's own name, block_sparse_moe
    state = {name.replace(".mlp.", ".block_sparse_moe."): t for name, t in model.state_dict().items()}
    packed_names = [n for n in stored if "_b2_" in n or "_b3_" in n or ".weight_" in n]
    # per layer: 2 projections x (3 fields at 2 bits + 4 at 3 bits) + 4 linears x 3 fields at 4 bits
    assert len(packed_names) == 2 * (2 * (3 + 4) + 4 * 3)
    for name in packed_names:
        assert state[name].dtype == stored[name].dtype, name
        assert torch.equal(state[name], stored[name]), name
    experts = model.model.layers[0].mlp.experts
    assert isinstance(experts, MixedBitExperts) and experts.expert_bits == [3, 2, 3, 2]
    assert isinstance(model.model.layers[0].self_attn.q_proj, PackedLinear)


def test_resave_writes_the_same_bytes(tmp_path):
    model = AutoModelForCausalLM.from_pretrained(FIXTURE)
    model.save_pretrained(tmp_path)
    before, after = _stored(FIXTURE), _stored(tmp_path)
    assert sorted(before) == sorted(after)
    for name in before:
        assert before[name].dtype == after[name].dtype and torch.equal(before[name], after[name]), name
    with safe_open(FIXTURE / "model.safetensors", "pt") as f, safe_open(tmp_path / "model.safetensors", "pt") as g:
        assert f.metadata()["moeq_allocation"] == g.metadata()["moeq_allocation"]


def test_logits_as_when_saved():
    model = AutoModelForCausalLM.from_pretrained(FIXTURE)
    expected = load_file(FIXTURE / "expected_logits.safetensors")
    with torch.no_grad():
        logits = model(expected["input_ids"]).logits
    torch.testing.assert_close(logits, expected["logits"], rtol=0, atol=1e-5)


def test_expert_weights_match_an_independent_dequantization():
    """Expert 1 of layer 0 (2 bits, slot 0 of the 2-bit tensors) read straight from the file."""
    model = AutoModelForCausalLM.from_pretrained(FIXTURE)
    stored = _stored(FIXTURE)
    prefix = "model.layers.0.block_sparse_moe.experts.down_proj_b2_"
    shifts = torch.arange(16, dtype=torch.int64) * 2
    words = stored[prefix + "q2"][0, 0].long() & 0xFFFFFFFF  # [K/16, N], 16 two-bit codes a word
    unpacked = ((words[:, None, :] >> shifts[None, :, None]) & 3).reshape(-1, words.shape[1]).double()  # [K, N]
    scale = stored[prefix + "scale"][0].double().repeat_interleave(32, dim=0)
    zero = stored[prefix + "zero"][0].double().repeat_interleave(32, dim=0)
    reference = ((unpacked - zero) * scale).T  # [N, K]
    packed = model.model.layers[0].mlp.experts.expert_projection("down_proj", 1)
    torch.testing.assert_close(dequantize_packed(packed).double(), reference, rtol=0, atol=1e-6)
