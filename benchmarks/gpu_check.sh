#!/usr/bin/env bash
# The one command for the GPU machine (H100/H200): GPU tests, kernel micro-benchmarks, the quick suite.
# Run from the repository root:   bash benchmarks/gpu_check.sh
# Everything lands flat in $OUT (<= 8 files): gpu_check.log, gpu_tests.log, results.json, kernels.json,
# report.md, training.png, maxctx.png. The summary is printed last (only the tail of stdout comes back).
# Knobs (environment):
#   STAGES="tests kernels quick"   stages to run, in this order (also: "full" for the full suite)
#   TOTAL_BUDGET=530               seconds for the whole script (stages get timeouts that fit in it)
#   TESTS_TIMEOUT=150 KERNELS_TIMEOUT=110
#   RUN_ARGS="..."                 extra arguments for benchmarks.run (e.g. "--systems hf,cpt_offload")
#   KERNEL_ARGS="..."              extra arguments for benchmarks.kernels (e.g. "--ops flce")
#   DEVICE=cpu                     dry run of this script on a CPU machine (tiny models, no timing claims)
set -uo pipefail
T0=$(date +%s)
OUT=${OUT:-outputs/gpu_check}
mkdir -p "$OUT"
STAGES=${STAGES:-"tests kernels quick"}
TOTAL_BUDGET=${TOTAL_BUDGET:-530}
TESTS_TIMEOUT=${TESTS_TIMEOUT:-150}
KERNELS_TIMEOUT=${KERNELS_TIMEOUT:-110}
RUN_ARGS=${RUN_ARGS:-}
KERNEL_ARGS=${KERNEL_ARGS:-}
DEVICE=${DEVICE:-cuda}
SUMMARY_RESERVE=25
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
TEE_PID=$!

elapsed() { echo $(( $(date +%s) - T0 )); }
left() { echo $(( TOTAL_BUDGET - $(elapsed) - SUMMARY_RESERVE )); }
stage_status=()
note() { stage_status+=("$1"); echo "== $1 (t=$(elapsed)s)"; }

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || echo "WARNING: installing the carried wheels failed"
else
  echo "WARNING: no .whl/ folder: liger-kernel rows will be 'unavailable' (run bash ../shared/tools/prepare_device_wheels.sh)"
fi
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTORCH_ALLOC_CONF=expandable_segments:True
[ "$DEVICE" = cuda ] && export TRITON_INTERPRET=0  # tests/conftest.py defaults it to 1 (CPU); real kernels here
export HF_HUB_OFFLINE=1 TRANSFORMERS_NO_ADVISORY_WARNINGS=1 TOKENIZERS_PARALLELISM=false

nvidia-smi --query-gpu=name,memory.total,memory.used,utilization.gpu,clocks.sm,clocks.max.sm,power.draw,power.limit --format=csv || true
python3 - <<'PY'
import importlib.metadata as md
import torch
names = ["torch", "transformers", "peft", "accelerate", "triton", "liger-kernel", "trl", "datasets", "bitsandbytes", "matplotlib"]
def v(n):
    try:
        return md.version(n)
    except Exception:
        return "missing"
print(" | ".join(f"{n} {v(n)}" for n in names))
print("cuda", torch.version.cuda, "| device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NONE")
PY

for stage in $STAGES; do
  case $stage in
    tests)
      t=$(( $(left) < TESTS_TIMEOUT ? $(left) : TESTS_TIMEOUT ))
      if (( t < 20 )); then note "tests: skipped (time budget)"; continue; fi
      echo "== tests (timeout ${t}s)"
      timeout -k 10 "$t" python3 -m pytest -m gpu -q -p no:cacheprovider tests/ 2>&1 | tee "$OUT/gpu_tests.log" | tail -40
      rc=${PIPESTATUS[0]}
      note "tests: exit $rc ($(grep -E '[0-9]+ (passed|failed)' "$OUT/gpu_tests.log" | tail -1))"
      ;;
    kernels)
      t=$(( $(left) < KERNELS_TIMEOUT ? $(left) : KERNELS_TIMEOUT ))
      if (( t < 20 )); then note "kernels: skipped (time budget)"; continue; fi
      echo "== kernels (timeout ${t}s)"
      timeout -k 10 "$t" python3 -m benchmarks.kernels --device "$DEVICE" --out "$OUT" $KERNEL_ARGS
      note "kernels: exit $?"
      ;;
    quick|full)
      t=$(left)
      if (( t < 60 )); then note "$stage: skipped (time budget)"; continue; fi
      echo "== $stage suite (timeout ${t}s)"
      timeout -k 10 "$t" python3 -m benchmarks.run --suite "$stage" --out "$OUT" --time-budget $(( t - 20 )) --no-report --device "$DEVICE" $RUN_ARGS
      note "$stage: exit $?"
      ;;
    *)
      note "unknown stage '$stage' (use tests, kernels, quick, full)"
      ;;
  esac
done

timeout 60 python3 -m benchmarks.report "$OUT" > /dev/null || echo "WARNING: report generation failed"
ls -la "$OUT"
echo
printf '%s\n' "${stage_status[@]}"
timeout 30 python3 -m benchmarks.report "$OUT" --summary || true
echo "total $(elapsed)s"
exec 1>&- 2>&-
wait "$TEE_PID" 2>/dev/null || true
