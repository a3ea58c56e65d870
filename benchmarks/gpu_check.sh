#!/usr/bin/env bash
# One command that confirms the CUDA path on a machine with a GPU (no machine
# of this project's CI has one). Run from the repository root with the package
# installed with its test and bench extras:
#
#   bash benchmarks/gpu_check.sh
#
# Steps, each bounded in time, then a pass/fail summary (exit status 1 if any
# step failed):
#   1. tests/kernels_cuda: the compiled Triton kernels on CUDA tensors against
#      float64 oracles, and the compiled backend end to end on CUDA;
#   2. tests/kernels in a process of its own, under the Triton interpreter
#      (POSTERIORS_FAST_TRITON_INTERPRET=1; its interpreted imports would break
#      the compiled kernels of step 1 in a shared process);
#   3. the rest of the test suite on this machine (CPU paths, dispatch);
#   4. the benchmark suite's CUDA rows: the native-kernel cases with their
#      Triton providers against cuBLAS/torch (what explain() marks as
#      unmeasured on CUDA) and the per-call method cases, written to
#      benchmarks/results/gpu.
# Budget: about 10 minutes on one GPU.
set -uo pipefail
cd "$(dirname "$0")/.."

if ! python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: no CUDA device visible to torch; nothing to check here" >&2
  exit 2
fi
python -c "import torch; print('gpu_check on', torch.cuda.get_device_name(), '| torch', torch.__version__)"

declare -a names results
run() {
  local name="$1" limit="$2"
  shift 2
  echo
  echo "=== $name (limit ${limit}s): $*"
  local start=$SECONDS
  timeout --signal=INT "$limit" "$@"
  local status=$?
  names+=("$name")
  if [ "$status" -eq 0 ]; then
    results+=("PASS ($((SECONDS - start)) s)")
  elif [ "$status" -eq 124 ]; then
    results+=("FAIL: timed out after ${limit} s")
  else
    results+=("FAIL: exit status $status")
  fi
}

export POSTERIORS_FAST_CI=1  # a missing dependency fails instead of skipping
run "CUDA kernels and backend" 180 python -m pytest tests/kernels_cuda -q -p no:cacheprovider
run "Triton kernels, interpreted" 150 \
  env POSTERIORS_FAST_TRITON_INTERPRET=1 python -m pytest tests/kernels -q -p no:cacheprovider
run "rest of the suite" 240 python -m pytest tests -q -p no:cacheprovider \
  --ignore=tests/kernels --ignore=tests/kernels_cuda
run "benchmarks, CUDA rows" 300 python -m benchmarks --device cuda --quick \
  --only "syrk,cov_downdate,cg step,ekf,laplace,empirical_fisher" --out benchmarks/results/gpu

echo
echo "=== gpu_check summary"
failed=0
for i in "${!names[@]}"; do
  printf '%-32s %s\n' "${names[$i]}" "${results[$i]}"
  case "${results[$i]}" in FAIL*) failed=1 ;; esac
done
if [ "$failed" -eq 0 ]; then
  echo "all steps passed; benchmark table in benchmarks/results/gpu"
fi
exit "$failed"
