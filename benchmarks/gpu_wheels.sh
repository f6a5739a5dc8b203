#!/usr/bin/env bash
# Fetch, where pip works, the wheels a network-less GPU machine needs beyond its image (which has
# torch, triton, accelerate, safetensors, huggingface_hub but an older transformers and no
# bitsandbytes; about 57 MB, under the device tool's 64 MiB carry limit): into .whl/
# (git-ignored), for `bash benchmarks/gpu.sh` there to install. Python 3.12, x86-64 Linux.
set -euo pipefail
cd "$(dirname "$0")/.."
transformers_version=$(python3 -c "import transformers; print(transformers.__version__)")
regex_version=$(python3 -c "from importlib.metadata import version; print(version('regex'))")
bnb_version=$(python3 -c "from importlib.metadata import version; print(version('bitsandbytes'))")
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 \
  -d .whl "transformers==$transformers_version" "regex==$regex_version" "bitsandbytes==$bnb_version"
ls -la .whl
