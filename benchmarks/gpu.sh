#!/usr/bin/env bash
# On a CUDA machine: check the kernels at real sizes against the torch reference, then measure.
#
#   bash benchmarks/gpu.sh [all|tests|kernels|calibration|sanitize|sweep|decode|decode-eager]...  (default: all)
#
# STAGE_TIMEOUT=seconds bounds each stage, a stage written NAME:SECONDS that one (a stage cut short
# keeps what it wrote). Tables land in
# benchmarks/results/ (kernels.md, calibration_memory_gpu.md, kernel_sweep.md, decode.md,
# decode_profile.md, decode_eager.md) and, when $OUT is set (the device tool), are copied there with a log. A machine without network gets the Python
# packages its image lacks from wheels in .whl/ (fetch them first, where pip works, with
# `bash benchmarks/gpu_wheels.sh`); otherwise the package is pip-installed as usual.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
# transformers >= 5.25 kernelizes CUDA models from the Hub by default; offline it fails to verify the
# kernels' publisher and from_pretrained raises. The measured paths are ours, not the Hub's.
export USE_HUB_KERNELS="${USE_HUB_KERNELS:-0}"
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(all)

inner="${MOEQ_GPU_SETUP_DONE:-}"  # set: a bounded stage, run by this script itself, set up already
if [ -n "$inner" ]; then
  :
elif compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
elif ! python3 -c "import optimum_moeq" 2>/dev/null; then
  python3 -m pip install -q -e ".[test]"
fi
export MOEQ_GPU_SETUP_DONE=1
[ -n "$inner" ] || python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__,
'transformers', transformers.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"

run_stage() {
  case "$1" in
    tests) python3 -m pytest -q -k "gpu or cuda" tests/test_triton_kernels.py tests/test_dp4a.py \
             tests/test_gptq_streaming.py tests/test_bnb.py ;;  # the GPU-only checks (the rest need the interpreter)
    kernels) python3 benchmarks/expert_kernels.py --batches "${KERNEL_BATCHES:-1,8,64,512,2048}" ;;
    calibration) python3 benchmarks/calibration_memory.py --device cuda --layers "${CALIBRATION_LAYERS:-1}" ;;
    sanitize)  # one decode and one prefill step; a tool the machine's runtime refuses is reported, not fatal
      local tool
      for tool in ${SANITIZE_TOOLS:-memcheck racecheck}; do
        compute-sanitizer --tool "$tool" --error-exitcode 3 python3 benchmarks/sanitize_step.py \
          || echo "compute-sanitizer $tool: exit $?"
      done ;;
    sweep) python3 benchmarks/kernel_sweep.py ;;
    decode) python3 benchmarks/decode.py --layers "${DECODE_LAYERS:-12}" --profile ;;
    decode-eager) python3 benchmarks/decode.py --layers "${DECODE_LAYERS:-12}" --eager \
                    --out benchmarks/results/decode_eager.md ;;
    all)  # every stage runs; the first failure's status is kept (set -e is off under ||)
      local rc=0 failed s
      for s in tests kernels calibration sanitize sweep decode decode-eager; do
        run_stage "$s" || { failed=$?; [ "$rc" -ne 0 ] || rc=$failed; }
      done
      return "$rc" ;;
    *) echo "unknown stage '$1': use all, tests, kernels, calibration, sanitize, sweep, decode or decode-eager" >&2
       exit 2 ;;
  esac
}

bounded_stage() {  # NAME[:SECONDS] under its time limit, if any (a function cannot run under timeout itself)
  local name="${1%%:*}" limit="${STAGE_TIMEOUT:-}"
  [ "$name" = "$1" ] || limit="${1#*:}"
  if [ -n "$limit" ]; then
    STAGE_TIMEOUT="" OUT="" timeout "$limit" bash "$0" "$name"
  else
    run_stage "$name"
  fi
}

status=0
for stage in "${stages[@]}"; do
  [ -n "$inner" ] || echo "== stage $stage ($(date +%T))"
  if [ -n "${OUT:-}" ]; then
    bounded_stage "$stage" 2>&1 | tee -a "$OUT/gpu.log" || status=$?
  else
    bounded_stage "$stage" || status=$?
  fi
done
if [ -n "${OUT:-}" ]; then
  for table in kernels calibration_memory_gpu kernel_sweep decode decode_profile decode_eager; do
    [ -f "benchmarks/results/$table.md" ] && cp "benchmarks/results/$table.md" "$OUT/"
  done
fi
exit $status
