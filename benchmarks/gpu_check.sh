#!/usr/bin/env bash
# The one command for the GPU machine (H100/H200): GPU tests, kernel micro-benchmarks, the quick suite.
# Run from the repository root:   bash benchmarks/gpu_check.sh
# Everything lands flat in $OUT (<= 8 files): gpu_check.log, gpu_tests.log, results.json, kernels.json,
# report.md, training.png, maxctx.png. The summary is printed last (only the tail of stdout comes back).
# Knobs (environment):
#   STAGES="tests kernels quick"   stages to run, in this order (also: "full" for the full suite)
#   TOTAL_BUDGET=530               seconds for the whole script (stages get timeouts that fit in it)
#   TESTS_TIMEOUT=150 KERNELS_TIMEOUT=110
#   TESTS_K="planner or lora"      only the GPU tests pytest's -k selects
#   RUN_ARGS="..."                 extra arguments for benchmarks.run (e.g. "--systems hf,cpt_offload")
#   QUICK_SYSTEMS=hf,unsloth,...   the quick/full suite's systems only (RUN_ARGS reach the long-context stages too)
#   A/B of two commits in one run: carry a second checkout (git archive OLD | tar -x -C .gpusnap_old), then
#   RUN_ARGS="--tree old=../.gpusnap_old" QUICK_SYSTEMS=cpt_offload_emb,cpt_offload_emb@old,...
#   KERNEL_ARGS="..."              extra arguments for benchmarks.kernels (e.g. "--ops flce")
#   DEVICE=cpu                     dry run of this script on a CPU machine (tiny models, no timing claims)
# Long-context stages (each writes its own subfolder of $OUT: results.json, report.md, PNGs):
#   longctx       Llama-3.2-1B shapes at batch 1 x LONGCTX_SHAPES: ours (recompute / offload) vs HF and the
#                 activation offloading of transformers >= 5.24, TRL and Axolotl; on the carried newest
#                 transformers (.whl/tf524) when it imports there, else on the image's
#   qlora         Mistral-7B shapes, QLoRA recipe (NF4, r=32, AdamW8bit) at batch 1 x QLORA_SHAPES, Unsloth included
#   profile       torch.profiler over two steps after warm-up of PROFILE_SYSTEMS (default cpt_offload) on
#                 PROFILE_WORKLOAD at PROFILE_SHAPE: top-30 kernels and the share of dtype copies ($OUT/profile)
#   qlora_maxctx  one-step probes of QLORA_MAXCTX_SYSTEMS (default cpt_offload) on the QLoRA workload from
#                 QLORA_MAXCTX_START to _CAP, bisected down to QLORA_MAXCTX_GRANULARITY tokens
#   evaluator     the held-out evaluator's share of wall time at its default frequency (benchmarks/evaluator_overhead.py)
#   export        `cpt-plugin export --to merged` and GGUF f16 timed at Llama-1B shapes (benchmarks/export_time.py)
#   tf524tests    `pytest -m gpu` again on the carried newest transformers
#   hostbreakdown host ms per step of each function in one forward ($HOSTBREAKDOWN_SYSTEMS, default cpt_nogc)
#   graphcheck    one CUDA-graph capture per piece of a patched decoder layer, each in its own process
#   trace         the allocations alive at one step's peak, by source line (benchmarks/memory_trace.py):
#                 TRACE_SYSTEM (cpt_offload) on TRACE_WORKLOAD (llama-1b), TRACE_LAYERS (4) layers, TRACE_SEQS
#   attention     causal SDPA forward + backward per PyTorch backend at W1's attention shape
#   hostcosts     host microseconds per call of GEMMs (each cuBLAS backend), casts, Triton launches ($OUT/hostcosts)
#   optimstep     one 8-bit AdamW step over W2's LoRA factors, bitsandbytes' against BatchedAdamW8bit ($OUT/optimstep)
#   flcebreakdown the fused loss' pieces per logits-chunk size, and Liger's call (benchmarks/flce_breakdown.py)
LONGCTX_SYSTEMS=${LONGCTX_SYSTEMS:-hf,hf_offload,trl_offload,axolotl_offload,cpt,cpt_offload_only,cpt_offload}
LONGCTX_SHAPES=${LONGCTX_SHAPES:-1x16384,1x32768}
QLORA_SYSTEMS=${QLORA_SYSTEMS:-hf,unsloth,cpt,cpt_offload_only,cpt_offload}
QLORA_SHAPES=${QLORA_SHAPES:-1x8192,1x32768}
QLORA_MAXCTX_START=${QLORA_MAXCTX_START:-131072}
QLORA_MAXCTX_CAP=${QLORA_MAXCTX_CAP:-131072}
QLORA_MAXCTX_SYSTEMS=${QLORA_MAXCTX_SYSTEMS:-cpt_offload}
QLORA_MAXCTX_GRANULARITY=${QLORA_MAXCTX_GRANULARITY:-16384}
PROFILE_SYSTEMS=${PROFILE_SYSTEMS:-cpt_offload}
PROFILE_WORKLOAD=${PROFILE_WORKLOAD:-llama-1b}
PROFILE_SHAPE=${PROFILE_SHAPE:-4x2048}
TRACE_SYSTEM=${TRACE_SYSTEM:-cpt_offload}
TRACE_WORKLOAD=${TRACE_WORKLOAD:-llama-1b}
TRACE_LAYERS=${TRACE_LAYERS:-4}
TRACE_SEQS=${TRACE_SEQS:-65536,131072}
TRACE_ARGS=${TRACE_ARGS:-}
set -uo pipefail
T0=$(date +%s)
OUT=${OUT:-outputs/gpu_check}
mkdir -p "$OUT"
STAGES=${STAGES:-"tests kernels quick"}
HOSTBREAKDOWN_SYSTEMS=${HOSTBREAKDOWN_SYSTEMS:-cpt_nogc}
HOSTBREAKDOWN_SHAPE=${HOSTBREAKDOWN_SHAPE:-4x2048}
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
  echo "WARNING: no .whl/ folder: liger-kernel and unsloth rows will be 'unavailable' (run bash ../shared/tools/prepare_device_wheels.sh unsloth==2026.10.9 unsloth_zoo==2026.10.9 gguf==0.19.0)"
fi
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
# The newest transformers (+ peft) beside the image's, used by the longctx and tf524tests stages only.
NEWEST_PYTHONPATH=$PYTHONPATH
if [[ " $STAGES " == *" longctx "* || " $STAGES " == *" tf524tests "* ]] && ls .whl/tf524/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site-tf524 .whl/tf524/*.whl \
    && PYTHONPATH=/tmp/site-tf524:$PYTHONPATH python3 -c "import transformers, peft, trl; print('newest:', transformers.__version__, peft.__version__)" \
    && NEWEST_PYTHONPATH=/tmp/site-tf524:$PYTHONPATH \
    || echo "WARNING: the carried newest transformers does not import here; longctx runs on the image's"
fi
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
      timeout -k 10 "$t" python3 -m pytest -m gpu -q -p no:cacheprovider ${TESTS_K:+-k "$TESTS_K"} tests/ 2>&1 | tee "$OUT/gpu_tests.log" | tail -40
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
      timeout -k 10 "$t" python3 -m benchmarks.run --suite "$stage" --out "$OUT" --time-budget $(( t - 20 )) --no-report --device "$DEVICE" ${QUICK_SYSTEMS:+--systems "$QUICK_SYSTEMS"} $RUN_ARGS
      note "$stage: exit $?"
      ;;
    longctx|qlora|qlora_maxctx)
      t=$(left)
      if (( t < 60 )); then note "$stage: skipped (time budget)"; continue; fi
      echo "== $stage (timeout ${t}s)"
      mkdir -p "$OUT/$stage"
      case $stage in
        longctx) py=$NEWEST_PYTHONPATH; args=(--workloads llama-1b --systems "$LONGCTX_SYSTEMS" --shapes "$LONGCTX_SHAPES" --warmup 1 --steps 3 --no-maxctx) ;;
        qlora) py=$PYTHONPATH; args=(--workloads mistral-7b-qlora --systems "$QLORA_SYSTEMS" --shapes "$QLORA_SHAPES" --warmup 1 --steps 3 --no-maxctx) ;;
        qlora_maxctx) py=$PYTHONPATH; args=(--workloads mistral-7b-qlora --systems "$QLORA_MAXCTX_SYSTEMS" --no-train --maxctx-start "$QLORA_MAXCTX_START" --maxctx-cap "$QLORA_MAXCTX_CAP" --maxctx-granularity "$QLORA_MAXCTX_GRANULARITY" --probe-timeout $(( t - 40 ))) ;;
      esac
      PYTHONPATH=$py timeout -k 10 "$t" python3 -m benchmarks.run --suite full --out "$OUT/$stage" --time-budget $(( t - 20 )) --device "$DEVICE" "${args[@]}" $RUN_ARGS | tail -40
      note "$stage: exit ${PIPESTATUS[0]}"
      timeout 30 python3 -m benchmarks.report "$OUT/$stage" --summary | tail -30 || true
      ;;
    profile)
      t=$(left)
      if (( t < 60 )); then note "profile: skipped (time budget)"; continue; fi
      echo "== profile of $PROFILE_SYSTEMS (timeout ${t}s)"
      timeout -k 10 "$t" python3 -m benchmarks.profile_step --systems "$PROFILE_SYSTEMS" --workload "$PROFILE_WORKLOAD" \
        --shape "$PROFILE_SHAPE" --device "$DEVICE" --out "$OUT/profile" --timeout $(( t - 20 )) | tail -60
      note "profile: exit ${PIPESTATUS[0]}"
      ;;
    evaluator|export)
      t=$(left)
      if (( t < 60 )); then note "$stage: skipped (time budget)"; continue; fi
      echo "== $stage (timeout ${t}s)"
      case $stage in
        evaluator) timeout -k 10 "$t" python3 -m benchmarks.evaluator_overhead --device "$DEVICE" --out "$OUT/evaluator" | tail -5 ;;
        export) timeout -k 10 "$t" python3 -m benchmarks.export_time --out "$OUT/export" $([ "$DEVICE" = cpu ] && echo --workload tiny-llama) | tail -8 ;;
      esac
      note "$stage: exit ${PIPESTATUS[0]}"
      ;;
    trace)
      t=$(left)
      if (( t < 60 )); then note "trace: skipped (time budget)"; continue; fi
      echo "== memory trace of $TRACE_SYSTEM on $TRACE_WORKLOAD, $TRACE_LAYERS layers, $TRACE_SEQS (timeout ${t}s)"
      timeout -k 10 "$t" python3 -m benchmarks.memory_trace --system "$TRACE_SYSTEM" --workload "$TRACE_WORKLOAD" \
        --layers "$TRACE_LAYERS" --seqs "$TRACE_SEQS" --top 30 $TRACE_ARGS --out "$OUT/trace" 2>&1 | grep -v "^cpt-plugin" | tail -80
      note "trace: exit ${PIPESTATUS[0]}"
      ;;
    flcebreakdown)
      echo "== the fused loss' time by piece and chunk size"
      timeout -k 10 150 python3 -m benchmarks.flce_breakdown --out "$OUT/flce" 2>&1 | tail -40
      note "flcebreakdown: exit ${PIPESTATUS[0]}"
      ;;
    attention)
      echo "== causal SDPA forward + backward per backend (llama-1b's attention at 4 x 2048)"
      timeout -k 10 90 python3 -m benchmarks.attention_backends --shape 4x2048 | tail -20
      note "attention: exit ${PIPESTATUS[0]}"
      ;;
    optimstep)
      echo "== one 8-bit AdamW step over mistral-7b-qlora's LoRA factors: bitsandbytes' against ours"
      timeout -k 10 120 python3 -m benchmarks.optimizer_step --workload mistral-7b-qlora --out "$OUT/optimstep" | tail -5
      note "optimstep: exit ${PIPESTATUS[0]}"
      ;;
    hostcosts)
      echo "== host cost per call"
      timeout -k 10 60 python3 -m benchmarks.host_costs --out "$OUT/hostcosts" | tail -40
      note "hostcosts: exit ${PIPESTATUS[0]}"
      ;;
    hostbreakdown)
      echo "== host time of one forward, by function ($HOSTBREAKDOWN_SYSTEMS)"
      for system in ${HOSTBREAKDOWN_SYSTEMS//,/ }; do
        timeout -k 10 120 python3 -m benchmarks.host_breakdown --systems "$system" --shape "$HOSTBREAKDOWN_SHAPE" \
          --out "$OUT/hostbreakdown" 2>&1 | grep -v "^cpt-plugin" | tail -30
      done
      note "hostbreakdown: exit ${PIPESTATUS[0]}"
      ;;
    graphcheck)
      t=$(left)
      if (( t < 60 )); then note "graphcheck: skipped (time budget)"; continue; fi
      echo "== which piece of a patched layer a CUDA graph cannot capture (timeout ${t}s)"
      timeout -k 10 "$t" python3 -m benchmarks.graph_capture_check --out "$OUT/graphcheck" 2>&1 | tail -40
      note "graphcheck: exit ${PIPESTATUS[0]}"
      ;;
    tf524tests)
      t=$(( $(left) < TESTS_TIMEOUT ? $(left) : TESTS_TIMEOUT ))
      if (( t < 20 )); then note "tf524tests: skipped (time budget)"; continue; fi
      echo "== tests on the newest transformers (timeout ${t}s)"
      PYTHONPATH=$NEWEST_PYTHONPATH timeout -k 10 "$t" python3 -m pytest -m gpu -q -p no:cacheprovider tests/ 2>&1 | tee "$OUT/gpu_tests_tf524.log" | tail -15
      rc=${PIPESTATUS[0]}
      note "tf524tests: exit $rc ($(grep -E '[0-9]+ (passed|failed)' "$OUT/gpu_tests_tf524.log" | tail -1))"
      ;;
    *)
      note "unknown stage '$stage' (use tests, kernels, quick, full, longctx, qlora, qlora_maxctx, profile, trace, evaluator, export, hostcosts, optimstep, flcebreakdown, hostbreakdown, graphcheck, tf524tests)"
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
