"""Tiny Mixtral checkpoints built in the test session: random weights, no network."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run on CPU tensors through the interpreter; set before any kernel is defined.
    os.environ.setdefault("TRITON_INTERPRET", "1")
from transformers import MixtralConfig, MixtralForCausalLM

NUM_EXPERTS = 8
HIDDEN = 64
INTERMEDIATE = 128
LAYERS = 2


def tiny_mixtral_config(**overrides) -> MixtralConfig:
    kwargs = dict(
        vocab_size=128,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=NUM_EXPERTS,
        num_experts_per_tok=2,
        max_position_embeddings=64,
    )
    kwargs.update(overrides)
    return MixtralConfig(**kwargs)


# Router row norms chosen per layer (expert index order), and the expert whose gate
# projection gets one neuron of very high variance, so the combined ranking moves it.
ROUTER_NORMS = [
    [0.8, 0.3, 1.4, 0.5, 1.1, 0.2, 0.9, 1.6],
    [1.2, 0.7, 0.1, 1.5, 0.4, 1.0, 0.6, 1.3],
]
HIGH_VARIANCE_EXPERT = [7, 3]


@pytest.fixture(scope="session")
def tiny_mixtral_path(tmp_path_factory):
    torch.manual_seed(0)
    model = MixtralForCausalLM(tiny_mixtral_config())
    with torch.no_grad():
        for layer, norms, loud in zip(model.model.layers, ROUTER_NORMS, HIGH_VARIANCE_EXPERT):
            router = layer.mlp.gate.weight
            router.copy_(router / router.norm(dim=1, keepdim=True) * torch.tensor(norms)[:, None])
            # gate rows of expert `loud`: one neuron 20x the spread of every other neuron
            layer.mlp.experts.gate_up_proj[loud, 5].mul_(20.0)
    path = tmp_path_factory.mktemp("tiny-mixtral")
    model.save_pretrained(path)
    return path


def quantize_argv(model, out, *extra, method="rtn", group_size=32) -> list[str]:
    """``moeq quantize`` arguments for the tiny models: 2.5 bits, a group size their widths divide."""
    return ["quantize", str(model), str(out), "--avg-bits", "2.5", "--group-size", str(group_size), "--method", method,
            *extra]  # fmt: skip


def tiny_switch(**changes):
    """A random Switch Transformers model, every encoder and decoder layer sparse."""
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    kwargs = dict(
        vocab_size=64, d_model=32, d_ff=64, d_kv=8, num_layers=2, num_decoder_layers=2, num_heads=2,
        num_experts=4, encoder_sparse_step=1, decoder_sparse_step=1,
    )  # fmt: skip
    kwargs.update(changes)
    return AutoModelForSeq2SeqLM.from_config(AutoConfig.for_model("switch_transformers", **kwargs))


def save_tiny_switch(path, **changes) -> None:
    tiny_switch(**changes).save_pretrained(path)
