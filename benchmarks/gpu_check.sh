#!/usr/bin/env bash
# The GPU-only checks, for the day a GPU machine is lent: one GPU, under 10 minutes.
#   1. a train step on cuda equals the CPU step in fp32 (relative 1e-4); a bf16 run's loss falls  (tests/test_gpu.py)
#   2. the Triton MoE kernels equal their torch references on cuda                              (tests/moe_triton_checks.py)
#   3. the dry run's parameter/optimizer bytes equal what a cuda run allocates                     (tests/test_gpu.py)
#   4. Triton vs torch MoE kernel throughput on the GPU                                            (benchmarks/bench_moe_kernels.py)
#   5. the MoE layer (torch / inductor / triton backends vs HF's block vs the GEMM floor) on cuda    (benchmarks/bench_moe_layer.py)
#   6. rollout: our KV-cache engine vs HF generate on cuda                                          (benchmarks/bench_rollout.py)
# Prints one summary table and each benchmark's table; each check's log is in $LOGS. Exit status 1 if any check failed.
# Usage: bash benchmarks/gpu_check.sh   (PYTHON=... to choose the interpreter)
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
export PYTHONPATH=$PWD
LOGS=${LOGS:-$(mktemp -d /tmp/gpu_check.XXXX)}
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: no CUDA device visible to $PY; nothing to check"; exit 0
fi
rows=()
failed=0
check() {  # check NAME COMMAND...: run with a 5-minute cap, record PASS/FAIL and seconds
  local name=$1; shift
  local start=$SECONDS log="$LOGS/${name// /_}.log"
  if timeout 300 "$@" >"$log" 2>&1; then status=PASS; else status=FAIL; failed=1; fi
  rows+=("$(printf '%-44s %-5s %5ss  %s' "$name" "$status" $((SECONDS - start)) "$log")")
}
check "cuda step == cpu step; bf16 loss falls" "$PY" -m pytest -q -p no:cacheprovider tests/test_gpu.py
check "triton kernels == torch reference (cuda)" env MOE_CHECK_DEVICE=cuda "$PY" tests/moe_triton_checks.py
check "moe kernel throughput (triton vs torch)" "$PY" benchmarks/bench_moe_kernels.py
check "moe layer on cuda (ours vs HF vs floor)" "$PY" benchmarks/bench_moe_layer.py --device cuda --repeats 10
check "rollout on cuda (ours vs HF generate)" "$PY" benchmarks/bench_rollout.py --device cuda --batches 1 16 64 --repeats 2
"$PY" -c "import torch; print('device:', torch.cuda.get_device_name(0), '| torch', torch.__version__)"
printf '%-44s %-5s %6s  %s\n' "check" "state" "time" "log"
printf '%s\n' "${rows[@]}"
for name in "moe kernel throughput (triton vs torch)" "moe layer on cuda (ours vs HF vs floor)" "rollout on cuda (ours vs HF generate)"; do
  echo "--- $name"
  grep -v "Loading weights" "$LOGS/${name// /_}.log" 2>/dev/null | tail -12
done
exit $failed
