#!/usr/bin/env bash
# On a CUDA machine: check the kernels at real sizes against the torch reference, then measure.
#
#   bash benchmarks/gpu.sh [all|tests|kernels|sweep|decode|decode-eager]...     (default: all)
#
# Tables land in benchmarks/results/ (kernels.md, kernel_sweep.md, decode.md, decode_profile.md,
# decode_eager.md) and, when $OUT is set (the device tool), are copied there with a log. A machine without network gets the Python
# packages its image lacks from wheels in .whl/ (fetch them first, where pip works, with
# `bash benchmarks/gpu_wheels.sh`); otherwise the package is pip-installed as usual.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(all)

if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
elif ! python3 -c "import optimum_moeq" 2>/dev/null; then
  python3 -m pip install -q -e ".[test]"
fi
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__,
'transformers', transformers.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"

run_stage() {
  case "$1" in
    tests) python3 -m pytest -q tests/test_triton_kernels.py tests/test_bnb.py ;;
    kernels) python3 benchmarks/expert_kernels.py ;;
    sweep) python3 benchmarks/kernel_sweep.py ;;
    decode) python3 benchmarks/decode.py --layers "${DECODE_LAYERS:-12}" --profile ;;
    decode-eager) python3 benchmarks/decode.py --layers "${DECODE_LAYERS:-12}" --eager \
                    --out benchmarks/results/decode_eager.md ;;
    all)  # every stage runs; the first failure's status is kept (set -e is off under ||)
      local rc=0 failed s
      for s in tests kernels sweep decode decode-eager; do
        run_stage "$s" || { failed=$?; [ "$rc" -ne 0 ] || rc=$failed; }
      done
      return "$rc" ;;
    *) echo "unknown stage '$1': use all, tests, kernels, sweep, decode or decode-eager" >&2; exit 2 ;;
  esac
}

status=0
for stage in "${stages[@]}"; do
  if [ -n "${OUT:-}" ]; then
    run_stage "$stage" 2>&1 | tee -a "$OUT/gpu.log" || status=$?
  else
    run_stage "$stage" || status=$?
  fi
done
if [ -n "${OUT:-}" ]; then
  for table in kernels kernel_sweep decode decode_profile decode_eager; do
    [ -f "benchmarks/results/$table.md" ] && cp "benchmarks/results/$table.md" "$OUT/"
  done
fi
exit $status
