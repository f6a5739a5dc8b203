"""Serving optimum-moeq checkpoints with vLLM (``pip install optimum-moeq[vllm]``).

vLLM loads its ``vllm.general_plugins`` entry points in every process it starts; ours,
``register``, registers the quantization method ``"moeq"``, which config.json's
``quantization_config.quant_method`` selects. ``vllm serve ./mixtral-moeq-2.5`` then loads the
checkpoint as saved: the packed experts through ``MoeqFusedMoEMethod`` (this project's kernels),
everything else as vLLM loads it. Importing this package does not import vLLM: vLLM pins its own
transformers, and only ``quantization`` (imported by ``register``) needs it.
"""

from .sharding import check_tensor_parallel, shard_packed, shard_zero_codes


def register() -> None:
    """The ``vllm.general_plugins`` entry point: registers quant_method ``"moeq"`` with vLLM."""
    from . import quantization  # noqa: F401  (the import registers the config)


__all__ = ["check_tensor_parallel", "register", "shard_packed", "shard_zero_codes"]
