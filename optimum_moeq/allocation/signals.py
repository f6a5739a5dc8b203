"""Per-expert signals of the router-norm method: router-norm change and MaxVar."""

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
    projection [I, H].

    This pass must keep up with reading the checkpoint. Each block of rows small enough to stay
    in the CPU cache (512 x 4096 bf16 = 4 MiB) is read in its own dtype for its sum and sum of
    squares, accumulated in float32 with no converted copy, which is much faster than a two-pass
    variance over float32 copies (benchmarks/results/notes.md). Where a row's mean dominates its
    spread that one-pass form loses precision; those blocks are recomputed two-pass in float64.
    """
    n = input_projection.shape[-1]
    best = float("-inf")
    for rows in input_projection.split(rows_per_chunk):
        total = torch.sum(rows, dim=-1, dtype=torch.float32).double()
        squares = torch.linalg.vector_norm(rows, dim=-1, dtype=torch.float32).double().square()
        centered = squares - total.square() / n
        if bool((centered <= 1e-2 * squares).any()):
            variance = torch.var(rows.double(), dim=-1)
        else:
            variance = centered / (n - 1)
        best = max(best, variance.max().item())
    return best
