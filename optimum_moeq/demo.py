"""The built-in default job: quantize a small Mixtral built here, with no download.

A random Mixtral has no trained router, so the allocation it shows exercises the method's
mechanics, not its quality; the figures printed compare the quantized model with its own
full-precision and dequantized references.
"""

from __future__ import annotations

import os
import tempfile

import torch
from transformers import AutoModelForCausalLM, MixtralConfig, MixtralForCausalLM

from .config import RouterNormConfig
from .footprint import experts_footprint
from .hub import write_model_card
from .plots import plot_allocation


def build_small_mixtral(path: str, *, layers: int = 4, experts: int = 8, hidden: int = 256, seed: int = 0) -> str:
    """Save a randomly initialised Mixtral to ``path`` and return it."""
    config = MixtralConfig(
        vocab_size=512,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        num_local_experts=experts,
        num_experts_per_tok=2,
        max_position_embeddings=256,
    )
    torch.manual_seed(seed)
    model = MixtralForCausalLM(config)
    with torch.no_grad():  # unequal router row norms, so that the ranking has something to rank
        for layer in model.model.layers:
            layer.mlp.gate.weight.mul_(torch.linspace(0.5, 1.5, experts)[torch.randperm(experts), None])
    model.save_pretrained(path)
    return path


def run_demo(
    avg_bits: float = 2.5, group_size: int = 64, method: str = "rtn", out: str | None = None
) -> dict[str, float]:
    """Build, quantize, report, save, reload, draw, evaluate, write the card; return the figures printed."""
    config = RouterNormConfig(avg_bits=avg_bits, group_size=group_size, method=method)  # bad values fail first
    if out is not None and os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise FileExistsError(f"{out} exists and is not an empty folder: choose a new folder for --out.")
    with tempfile.TemporaryDirectory() as tmp:
        source = build_small_mixtral(os.path.join(tmp, "mixtral-small"))
        full = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
        quantized = AutoModelForCausalLM.from_pretrained(source, quantization_config=config, dtype=torch.float32)
        print(f"\nAllocation ({config.ranking} ranking, levels {tuple(config.bit_levels)}, avg_bits={avg_bits}):")
        print(quantized.hf_quantizer.allocation)
        footprint = experts_footprint(quantized)
        print(f"\nExperts: {footprint}")

        tokens = torch.randint(0, full.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            reference, logits = full(tokens).logits, quantized(tokens).logits
        rel_error = ((logits - reference).norm() / reference.norm()).item()
        print(f"Relative logit error vs float32: {rel_error:.4f}")

        saved = out or os.path.join(tmp, "mixtral-small-moeq")
        quantized.save_pretrained(saved)
        reloaded = AutoModelForCausalLM.from_pretrained(saved)
        with torch.no_grad():
            reload_diff = (reloaded(tokens).logits - logits).abs().max().item()
        print(f"Saved to {saved}; reloaded logits differ by {reload_diff:.3g} (max abs)")
        picture = plot_allocation(quantized.hf_quantizer.allocation, os.path.join(saved, "allocation.png"))
        print(f"Allocation picture: {picture}")
        accuracy = _evaluate_on_bundled_task(reloaded, saved)
        card = write_model_card(saved, name="mixtral-small-moeq", allocation=quantized.hf_quantizer.allocation)
        print(f"Model card: {card}")
    return {
        "average_bits": quantized.hf_quantizer.allocation.average_bits,
        "bits_per_weight_with_metadata": footprint.bits_per_weight_with_metadata,
        "relative_logit_error": rel_error,
        "reload_max_abs_diff": reload_diff,
        "bundled_task_accuracy": accuracy,
    }


def word_tokenizer(texts):
    """A word-level tokenizer over ``texts`` (the demo model and the bundled task need no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for text in texts for w in text.split()})
    vocab = {"[UNK]": 0, "[PAD]": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", eos_token="</s>")


def _evaluate_on_bundled_task(model, folder: str) -> float | None:
    """lm-eval on the bundled task (package data); the accuracy goes into the model card."""
    try:
        from .evaluation import evaluate
        from .tasks import BUNDLED_TASK_NAME, bundled_task, bundled_task_docs

        tokenizer = word_tokenizer(text for d in bundled_task_docs() for text in [d["question"], *d["choices"]])
        tokenizer.save_pretrained(folder)
        results = evaluate(model, tokenizer, [bundled_task()], save_to=folder)
    except ImportError:
        print("Evaluation skipped: pip install 'optimum-moeq[eval]' for lm-eval.")
        return None
    accuracy = results["results"][BUNDLED_TASK_NAME]["acc,none"]
    print(f"lm-eval on the bundled task (12 questions, 3 choices; random model, chance is 1/3): acc {accuracy:.3f}")
    return accuracy
