"""One decode step (GEMV kernels) and one prefill step (tl.dot kernels) of a mixed-bit experts
layer on the GPU, ids outside [0, E) included, for compute-sanitizer:

    compute-sanitizer --tool memcheck python3 benchmarks/sanitize_step.py
    compute-sanitizer --tool racecheck python3 benchmarks/sanitize_step.py

Prints the relative error of each step against the torch reference (the sanitizer's report is
the result; the errors only show the steps ran).
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from expert_kernels import build_experts  # noqa: E402


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("sanitize_step.py runs the kernels on a CUDA device.")
    generator = torch.Generator().manual_seed(0)
    module = build_experts([3, 2, 3, 2, 4, 1, 3, 2], 1024, 2048, 128, "cuda")
    for tokens in (1, 64):
        index = torch.randint(0, 8, (tokens, 2), generator=generator)
        index[::4, 1] = torch.tensor([-1, 8])[torch.arange(len(index[::4])) % 2]
        weights = torch.rand(tokens, 2, generator=generator)
        x = torch.randn(tokens, 1024, generator=generator).to(torch.bfloat16)
        inside = (index >= 0) & (index < 8)
        module.kernel = "triton"
        out = module(x.cuda(), index.cuda(), weights.cuda()).float().cpu()
        module.kernel = "torch"
        ref = module(x.float().cuda(), torch.where(inside, index, 0).cuda(), torch.where(inside, weights, 0).cuda())
        torch.cuda.synchronize()
        print(f"{tokens} tokens: relative error {((out - ref.cpu()).norm() / ref.norm()).item():.2e}")


if __name__ == "__main__":
    main()
