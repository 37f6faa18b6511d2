#!/usr/bin/env bash
# Spark's GPU discovery script (spark.worker.resource.gpu.discoveryScript) for benchmarks/gpu_check.py:
# prints {"name": "gpu", "addresses": ["0", ...]}, the GPUs nvidia-smi lists, else those torch sees.
# GPU_CHECK_ADDRESSES="0" replaces both: the CPU dry run of gpu_check.sh, which schedules a task on a
# GPU slot without touching a GPU.
if [ -n "${GPU_CHECK_ADDRESSES:-}" ]; then
    ids="$GPU_CHECK_ADDRESSES"
elif ids=$(nvidia-smi --query-gpu=index --format=csv,noheader 2>/dev/null) && [ -n "$ids" ]; then
    :
else
    ids=$("${GPU_CHECK_PYTHON:-python3}" -c \
        "import torch; print(' '.join(map(str, range(torch.cuda.device_count()))))" 2>/dev/null)
fi
printf '{"name": "gpu", "addresses": ['
sep=""
for id in $(echo "$ids" | tr ',' ' '); do printf '%s"%s"' "$sep" "$id"; sep=", "; done
printf ']}\n'
