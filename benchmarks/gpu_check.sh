#!/usr/bin/env bash
# The GPU path of bertxml, measured in one short run (about 8 minutes at most) on a machine with CUDA:
#
#     bash benchmarks/gpu_check.sh
#
# Stages, each in its own guarded step with its own time limit (a failed stage is FAILED in the table with
# its error's last line, and the next stage runs):
#   tests   pytest -m gpu tests/test_gpu.py: bf16 forward/backward, the label attention's fp32 softmax, the
#           scorer on CUDA against the CPU fp32 engine
#   train   fine-tuning steps of the small and big models at 1,024 tokens: tokens/s, MFU against the
#           GPU's measured bf16 matmul peak, peak memory (benchmarks/gpu_check.py train)
#   spark   a night of notes through bertxml.scoring.udf.score_notes on GPU-scheduled Spark tasks
#           (spark.task.resource.gpu.amount=1), notes/s against the engine called directly
#   ddp     one DistributedDataParallel step under torchrun, nccl (up to 2 GPUs)
# then one summary table. Exit status: 0 when every stage passed (or there is no GPU: skipped), 1 when a
# stage failed, 2 when the GPU is there but the Python packages are not. Without java or Spark's jars the
# spark stage alone is SKIPPED.
#
# Offline: nothing is installed or downloaded. Python: $PYTHON, else the repository's .venv/bin/python,
# else python3. Logs: $GPU_CHECK_LOGS (default a temp folder). GPU_CHECK_DRY_RUN=1 runs every stage on
# the CPU with tiny sizes (the Spark stage on a pretend GPU slot) to check the script without a GPU; its
# figures mean nothing.
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x "$ROOT/.venv/bin/python" ]; then PY=$ROOT/.venv/bin/python
else PY=$(command -v python3 || echo python3)
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYSPARK_PYTHON="$PY" PYSPARK_DRIVER_PYTHON="$PY" GPU_CHECK_PYTHON="$PY"
export TOKENIZERS_PARALLELISM=false
DRY=${GPU_CHECK_DRY_RUN:-0}

echo "bertxml GPU check: $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?'), python $PY"

# ---- is there a GPU, and can this Python use it? -------------------------------------------------------
hw_gpus=""
if command -v nvidia-smi >/dev/null 2>&1; then
    hw_gpus=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null)
fi
torch_info=$("$PY" -c 'import torch; print(torch.__version__, torch.version.cuda, torch.cuda.device_count() if torch.cuda.is_available() else 0)' 2>/dev/null)
torch_ok=$?
n_cuda=0
if [ $torch_ok -eq 0 ]; then n_cuda=${torch_info##* }; fi

if [ "$DRY" != "1" ] && [ "$n_cuda" = "0" ] && [ -z "$hw_gpus" ]; then
    if [ $torch_ok -eq 0 ]; then seen="torch ${torch_info% *} sees no CUDA device"; else seen="torch is not importable"; fi
    echo "no CUDA device: skipped ($seen, and nvidia-smi lists no GPU)."
    echo "Run this on a machine with an NVIDIA GPU: bash benchmarks/gpu_check.sh"
    exit 0
fi

missing=""
for module in torch transformers tokenizers safetensors numpy pandas pyarrow yaml pyspark pytest; do
    "$PY" -c "import $module" >/dev/null 2>&1 || missing="$missing $module"
done
# The Spark stage alone needs a JVM and Spark's jars; without them it is SKIPPED (named in the table) and the
# other stages still run: a GPU image often has neither, and bertxml itself needs only pyspark's Python part.
spark_missing=""
command -v java >/dev/null 2>&1 || spark_missing="no java on PATH"
if ! "$PY" -c 'import os, pyspark, sys; sys.exit(0 if os.path.isdir(os.path.join(os.path.dirname(pyspark.__file__), "jars")) else 1)' >/dev/null 2>&1; then
    spark_missing="${spark_missing:+$spark_missing, }pyspark without its jars"
fi
if [ "$DRY" != "1" ]; then
    if [ $torch_ok -eq 0 ] && [ "$n_cuda" = "0" ]; then
        echo "nvidia-smi lists a GPU ($hw_gpus) but torch $torch_info cannot use it (a CPU-only torch build?)." >&2
        missing="$missing torch-with-CUDA"
    fi
    if [ -n "$missing" ]; then
        echo "cannot run the GPU check: missing with $PY:$missing" >&2
        echo "Install the project first (make install, or pip install -e '.[local,dev]'), then rerun; this script installs nothing." >&2
        exit 2
    fi
    gpu_name=$("$PY" -c 'import torch; print(torch.cuda.get_device_name(0))')
    echo "GPU: $gpu_name x $n_cuda (torch ${torch_info% *}; nvidia-smi: $(echo "$hw_gpus" | head -1))"
    DEVICE=cuda
    nproc=$(( n_cuda < 2 ? n_cuda : 2 ))
    TRAIN_ARGS=(--device cuda --sizes small big --seq-len 1024 --batch 32 --steps 30)
    SPARK_ARGS=(--device auto --notes 4000 --size small --max-len 512)
else
    if [ -n "$missing" ]; then echo "dry run: missing with $PY:$missing" >&2; exit 2; fi
    gpu_name="none (dry run on the CPU: figures mean nothing)"
    echo "GPU: $gpu_name"
    DEVICE=cpu
    nproc=2
    export GPU_CHECK_ADDRESSES=0 BERTXML_GPU_TESTS_ON=cpu
    TRAIN_ARGS=(--device cpu --sizes tiny --seq-len 64 --batch 2 --steps 2)
    SPARK_ARGS=(--device cpu --notes 40 --size tiny --max-len 128 --labels 50 --vocab-size 2000 --reps 1
                --check-notes 4 --cores 2 --memory-mb 2048)
fi

LOGS=${GPU_CHECK_LOGS:-$(mktemp -d -t bertxml-gpu-check.XXXXXX)}
mkdir -p "$LOGS"
echo "logs: $LOGS"

# ---- stages ---------------------------------------------------------------------------------------------
names=() results=() seconds=() figures=()
failed=0

# run_stage NAME LIMIT_SECONDS COMMAND...: runs COMMAND under `timeout`, its output shown and kept in
# $LOGS/NAME.log; records ok (with the command's last `SUMMARY` line) or FAILED (with its last line).
run_stage() {
    local name=$1 limit=$2
    shift 2
    echo
    echo "==== $name (limit ${limit}s): $*"
    local start=$SECONDS rc
    timeout --kill-after=15 "$limit" "$@" 2>&1 | tee "$LOGS/$name.log"
    rc=${PIPESTATUS[0]}
    local took=$((SECONDS - start)) detail
    if [ "$rc" -eq 0 ]; then
        detail=$(grep '^SUMMARY ' "$LOGS/$name.log" | tail -1 | cut -c9-)
        [ -n "$detail" ] || detail=$(grep -v '^\s*$' "$LOGS/$name.log" | tail -1)
        results+=("ok")
    else
        if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
            detail="timed out after ${limit}s; last line: $(grep -v '^\s*$' "$LOGS/$name.log" | tail -1)"
        else
            detail="exit $rc: $(grep -v '^\s*$' "$LOGS/$name.log" | tail -1)"
        fi
        results+=("FAILED")
        failed=1
    fi
    names+=("$name") seconds+=("$took") figures+=("${detail:0:160}")
}

run_stage tests 100 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py
run_stage train 150 "$PY" benchmarks/gpu_check.py train "${TRAIN_ARGS[@]}"
if [ -z "$spark_missing" ]; then
    run_stage spark 180 "$PY" benchmarks/gpu_check.py spark "${SPARK_ARGS[@]}"
else
    echo; echo "==== spark: SKIPPED ($spark_missing)"
    names+=(spark) results+=(SKIPPED) seconds+=(0) figures+=("$spark_missing")
fi
run_stage ddp 60 "$PY" -m torch.distributed.run --standalone --nproc_per_node "$nproc" \
    benchmarks/gpu_check.py ddp --device "$DEVICE"

# ---- the table ------------------------------------------------------------------------------------------
echo
echo "bertxml GPU check on: $gpu_name"
printf '%-6s %-7s %8s  %s\n' stage result seconds "figures (or the error's last line)"
printf '%s\n' "--------------------------------------------------------------------------------------------"
for i in "${!names[@]}"; do
    printf '%-6s %-7s %8s  %s\n' "${names[$i]}" "${results[$i]}" "${seconds[$i]}" "${figures[$i]}"
done
if [ "$failed" -ne 0 ]; then
    echo "some stages FAILED: their logs are in $LOGS"
fi
exit "$failed"
