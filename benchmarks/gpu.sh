#!/usr/bin/env bash
# On a CUDA machine, in one command: install, check the kernels at real sizes against the torch
# reference, then measure. Tables land in benchmarks/results/ (kernels.md, kernel_sweep.md, decode.md).
set -euo pipefail
cd "$(dirname "$0")/.."
pip install -q -e ".[test]"
python -m pytest -q tests/test_triton_kernels.py
python benchmarks/kernels.py
python benchmarks/kernel_sweep.py
python benchmarks/decode.py --layers "${DECODE_LAYERS:-12}"
