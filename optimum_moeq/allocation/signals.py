"""Per-expert signals of the router-norm method (DESIGN.md section 1, steps 1 and 3)."""

from __future__ import annotations

import torch


def router_norm_change(router: torch.Tensor, reference: torch.Tensor | None = None) -> torch.Tensor:
    """s_e = ||R_e|| - ||R_e(reference)|| per expert row of ``router`` [E, H], in float64.

    Without a reference all rows started at the same random scale, so the final norm alone ranks.
    """
    norms = torch.linalg.vector_norm(router.double(), dim=-1)
    if reference is None:
        return norms
    if reference.shape != router.shape:
        raise ValueError(
            f"reference router shape {tuple(reference.shape)} does not match the router's {tuple(router.shape)}."
        )
    return norms - torch.linalg.vector_norm(reference.double(), dim=-1)


def max_neuron_variance(input_projection: torch.Tensor, rows_per_chunk: int = 512) -> float:
    """v_e = max over neurons n of Var_k(W_e[n, k]) (sample variance) for one expert's input
    projection [I, H]. float32 (two-pass; about 1e-7 relative, ample for a ranking) a chunk of
    rows at a time: twice the speed of float64 and a small temporary, since this pass must keep
    up with reading the checkpoint. (A one-pass sum / sum-of-squares straight from bf16 measured
    no faster on benchmarks/allocation.py and used more memory.)"""
    return max(torch.var(rows.float(), dim=-1).max().item() for rows in input_projection.split(rows_per_chunk))
