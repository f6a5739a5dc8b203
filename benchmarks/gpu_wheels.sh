#!/usr/bin/env bash
# Fetch, where pip works, the wheels a network-less GPU machine needs beyond its image (which has
# torch, triton, accelerate, safetensors, an older huggingface_hub and transformers and no
# bitsandbytes): transformers and the requirements it adds (huggingface_hub 2, kernels, httpx2, ...)
# at the versions installed here, into .whl/ (git-ignored), for `bash benchmarks/gpu.sh` there to
# install. Python 3.12, x86-64 Linux. About 22 MB without bitsandbytes (BNB=0), under the device
# tool's 64 MiB carry limit either way.
set -euo pipefail
cd "$(dirname "$0")/.."
packages=(transformers huggingface_hub kernels httpx2 httpcore2 truststore tomlkit click regex hf-xet idna)
[ "${BNB:-1}" = 0 ] || packages+=(bitsandbytes)
pins=()
for package in "${packages[@]}"; do
  pins+=("$package==$(python3 -c "from importlib.metadata import version; print(version('$package'))")")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl "${pins[@]}"
ls -la .whl
