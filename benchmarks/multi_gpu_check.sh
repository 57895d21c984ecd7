#!/usr/bin/env bash
# The one command for a 2-GPU machine: cpt-plugin under DDP, FSDP2 and DeepSpeed ZeRO-2 vs one GPU.
# Run from the repository root:   OUT=/some/dir bash benchmarks/multi_gpu_check.sh
# Stages (each a fresh process group under `timeout -k`, all within TOTAL_BUDGET):
#   single          python benchmarks/distributed/train.py on GPU 0, the whole global batch per step
#   ddp, fsdp2      accelerate launch --config_file benchmarks/distributed/{ddp,fsdp2}.yaml on 2 GPUs
#   deepspeed_zero2 the same with deepspeed_zero2.yaml when `import deepspeed` works, else 'unavailable'
#   ddp_offload, fsdp2_offload, deepspeed_zero2_offload   offloaded checkpointing (the others recompute)
# then benchmarks/distributed/compare.py (exit 1 on a loss mismatch). Everything lands flat in $OUT
# (<= 10 files): multi_gpu_check.log (this output), stages.log (every stage's full output), one JSON per
# stage, summary.md. The summary table is printed last.
# Knobs (environment):
#   TOTAL_BUDGET=520  STAGE_TIMEOUT=150     seconds (a stage is skipped when < 40 s are left for it)
#   STAGES="single ddp fsdp2 deepspeed_zero2 ddp_offload fsdp2_offload"
#   TRAIN_ARGS="..."   extra train.py arguments for every stage (e.g. "--steps 20 --lr 5e-4")
#   NPROC=2            processes (GPUs) of the distributed stages
#   TF=image|newest    transformers of the image, or the carried newest one (.whl/tf524/*.whl)
#   MASTER_PORT_BASE=29611  stage k launches on port MASTER_PORT_BASE + k
#   DEVICE=cpu         dry run on a CPU machine: tiny model, gloo, 2 processes (FSDP2 through the CPU shim of
#                      train.py; DeepSpeed 'unavailable'); PYTHON defaults to .venv/bin/python there
# Wheels: .whl/*.whl go to /tmp/site (as in gpu_check.sh); .whl/deepspeed/*.whl (DeepSpeed built with
# DS_BUILD_OPS=0 + its pure/cp312 dependencies) too, each only when its module does not import already.
set -uo pipefail
T0=$(date +%s)
OUT=${OUT:-outputs/multi_gpu_check}
mkdir -p "$OUT"
DEVICE=${DEVICE:-cuda}
TOTAL_BUDGET=${TOTAL_BUDGET:-520}
STAGE_TIMEOUT=${STAGE_TIMEOUT:-150}
STAGES=${STAGES:-"single ddp fsdp2 deepspeed_zero2 ddp_offload fsdp2_offload"}
TRAIN_ARGS=${TRAIN_ARGS:-}
NPROC=${NPROC:-2}
TF=${TF:-image}
if [ "$DEVICE" = cpu ] && [ -x .venv/bin/python ]; then PYTHON=${PYTHON:-.venv/bin/python}; fi
PYTHON=${PYTHON:-python3}
SUMMARY_RESERVE=15
MIN_STAGE=40
KILL_GRACE=40  # after a timeout, torchrun gets this long to stop its workers (it waits up to 30 s) before SIGKILL
exec > >(tee -a "$OUT/multi_gpu_check.log") 2>&1
TEE_PID=$!

elapsed() { echo $(( $(date +%s) - T0 )); }
left() { echo $(( TOTAL_BUDGET - $(elapsed) - SUMMARY_RESERVE )); }
stage_status=()
note() { stage_status+=("$1"); echo "== $1 (t=$(elapsed)s)"; }
stub() {  # a JSON that compare.py shows as an unavailable / failed row
  "$PYTHON" -c 'import json,sys; json.dump({"label": sys.argv[2], sys.argv[3]: sys.argv[4]}, open(sys.argv[1], "w"))' \
    "$OUT/$1.json" "$1" "$2" "$3"
}

# ---- environment -----------------------------------------------------------------------------
if [ "$DEVICE" = cuda ]; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      || echo "WARNING: installing the carried wheels failed"
  fi
  if ls .whl/deepspeed/*.whl >/dev/null 2>&1; then
    # only what the image lacks (a carried pydantic must not shadow a working one)
    mapfile -t DS_WHEELS < <("$PYTHON" - <<'PY'
import glob, importlib.util, os
modules = {"deepspeed": "deepspeed", "hjson": "hjson", "py_cpuinfo": "cpuinfo", "ninja": "ninja",
           "msgpack": "msgpack", "einops": "einops"}
pydantic_family = ("pydantic", "pydantic_core", "annotated_types", "typing_inspection", "typing_extensions")
try:
    import pydantic
    pydantic_ok = int(pydantic.VERSION.split(".")[0]) >= 2
except Exception:
    pydantic_ok = False
for wheel in sorted(glob.glob(".whl/deepspeed/*.whl")):
    dist = os.path.basename(wheel).split("-")[0].lower()
    if dist in pydantic_family:
        if not pydantic_ok:
            print(wheel)
    elif importlib.util.find_spec(modules.get(dist, dist)) is None:
        print(wheel)
PY
)
    if (( ${#DS_WHEELS[@]} )); then
      echo "installing: ${DS_WHEELS[*]##*/}"
      DS_BUILD_OPS=0 "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site "${DS_WHEELS[@]}" || echo "WARNING: installing the DeepSpeed wheels failed"
    fi
  fi
  export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
  if [ "$TF" = newest ] && ls .whl/tf524/*.whl >/dev/null 2>&1; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site-tf524 .whl/tf524/*.whl \
      && PYTHONPATH=/tmp/site-tf524:$PYTHONPATH "$PYTHON" -c "import transformers, peft" \
      && export PYTHONPATH=/tmp/site-tf524:$PYTHONPATH \
      || echo "WARNING: the carried newest transformers does not import here; using the image's"
  fi
  export TRITON_INTERPRET=0 PYTORCH_ALLOC_CONF=expandable_segments:True
  CPU_FLAG=""
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
  export OMP_NUM_THREADS=1
  unset TRITON_INTERPRET  # kernels patched in, run as their PyTorch fallbacks (the interpreter takes seconds a step)
  CPU_FLAG="--cpu --kernels on"
fi
export NCCL_NVLS_ENABLE=0  # NVLink multicast off on shared hosts (every GPU command of this script)
export HF_HUB_OFFLINE=1 TRANSFORMERS_NO_ADVISORY_WARNINGS=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

if [ "$DEVICE" = cuda ]; then
  nvidia-smi --query-gpu=index,name,memory.total,memory.used,utilization.gpu,clocks.sm,power.draw --format=csv || true
  nvidia-smi topo -m 2>/dev/null | head -6 || true
fi
"$PYTHON" - <<'PY'
import importlib.metadata as md
import torch
def v(n):
    try:
        return md.version(n)
    except Exception:
        return "missing"
names = ["torch", "transformers", "accelerate", "peft", "triton", "deepspeed", "pydantic"]
print(" | ".join(f"{n} {v(n)}" for n in names))
print("cuda", torch.version.cuda, "| GPUs", torch.cuda.device_count(),
      "|", ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())) or "none")
PY

# ---- stages ----------------------------------------------------------------------------------
TRAIN=benchmarks/distributed/train.py
CFG=benchmarks/distributed
PORT=${MASTER_PORT_BASE:-29611}  # first stage uses PORT+1; tests pass a free one
reap() {  # workers of this stage left behind (torchrun starts them in sessions of their own): by PID
  local name=$1 pid
  for pid in $(ls /proc 2>/dev/null | grep -E '^[0-9]+$'); do
    if { tr '\0' ' ' < "/proc/$pid/cmdline"; } 2>/dev/null | grep -qF -- "--out $OUT/$name.json"; then
      echo "killing leftover process $pid of $name"; kill -9 "$pid" 2>/dev/null
    fi
  done
}
run_stage() {  # name, command...
  local name=$1; shift
  local t; t=$(( $(left) - KILL_GRACE )); (( t > STAGE_TIMEOUT )) && t=$STAGE_TIMEOUT
  if (( t < MIN_STAGE )); then note "$name: skipped (time budget)"; stub "$name" unavailable "skipped: time budget"; return; fi
  rm -f "$OUT/$name.json"
  echo "== $name (timeout ${t}s): $*"
  echo "===== $name: $*" >> "$OUT/stages.log"
  local s0 l0; s0=$(date +%s); l0=$(wc -l < "$OUT/stages.log")
  timeout -k "$KILL_GRACE" "$t" "$@" >> "$OUT/stages.log" 2>&1
  local rc=$?
  reap "$name"
  if [ $rc -eq 0 ] && [ -s "$OUT/$name.json" ]; then
    note "$name: ok in $(( $(date +%s) - s0 ))s"
  else
    local why="exit $rc"; (( rc == 124 || rc == 137 )) && why="timed out after ${t}s"
    note "$name: FAILED ($why)"
    echo "---- errors and last lines of $name (all in stages.log):"
    tail -n +$(( l0 + 1 )) "$OUT/stages.log" | grep -E "(Error|Exception|error)[:(]" | grep -v "^ *raise " \
      | sort -u | tail -n 8 | cut -c1-400
    tail -n +$(( l0 + 1 )) "$OUT/stages.log" | tail -n 12 | cut -c1-300
    [ -s "$OUT/$name.json" ] || stub "$name" failed "$why; see stages.log"
  fi
  sleep 2
}
launch() {  # config, name, extra train.py args...
  local config=$1 name=$2; shift 2
  PORT=$(( PORT + 1 ))
  local mp=(); [ "$DEVICE" = cpu ] && mp=(--mixed_precision no)
  run_stage "$name" "$PYTHON" -m accelerate.commands.launch --config_file "$CFG/$config.yaml" \
    --num_processes "$NPROC" --main_process_port "$PORT" ${mp[@]+"${mp[@]}"} \
    "$TRAIN" $CPU_FLAG --label "$name" --out "$OUT/$name.json" $TRAIN_ARGS "$@"
}

for stage in $STAGES; do
  case $stage in
    single)
      run_stage single env CUDA_VISIBLE_DEVICES=0 "$PYTHON" "$TRAIN" $CPU_FLAG --label single \
        --out "$OUT/single.json" $TRAIN_ARGS ;;
    ddp) launch ddp ddp ;;
    fsdp2) launch fsdp2 fsdp2 ;;
    deepspeed_zero2)
      if [ "$DEVICE" = cpu ]; then
        note "deepspeed_zero2: unavailable (CPU dry run)"; stub deepspeed_zero2 unavailable "CPU dry run"
      elif ! err=$("$PYTHON" -c "import deepspeed" 2>&1 >/dev/null); then
        note "deepspeed_zero2: unavailable (import deepspeed failed)"
        stub deepspeed_zero2 unavailable "import deepspeed failed: $(echo "$err" | tail -n 1 | cut -c1-150)"
      else
        launch deepspeed_zero2 deepspeed_zero2
      fi ;;
    ddp_offload) launch ddp ddp_offload --checkpointing offload ;;
    fsdp2_offload) launch fsdp2 fsdp2_offload --checkpointing offload ;;
    deepspeed_zero2_offload)
      if [ "$DEVICE" = cpu ] || ! "$PYTHON" -c "import deepspeed" >/dev/null 2>&1; then
        note "deepspeed_zero2_offload: unavailable"; stub deepspeed_zero2_offload unavailable "no deepspeed here"
      else
        launch deepspeed_zero2 deepspeed_zero2_offload --checkpointing offload
      fi ;;
    *) note "unknown stage '$stage'" ;;
  esac
done

# ---- summary ---------------------------------------------------------------------------------
ls -la "$OUT"
echo
printf '%s\n' "${stage_status[@]}"
echo
timeout 60 "$PYTHON" -m benchmarks.distributed.compare "$OUT" --out "$OUT/summary.md"
rc=$?
echo "compare exit $rc; total $(elapsed)s"
exec 1>&- 2>&-
wait "$TEE_PID" 2>/dev/null || true
exit $rc
