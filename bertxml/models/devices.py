"""Which device a model runs on: the GPU Spark gave this task, else CUDA when present, else the CPU.

Torch is imported only inside `resolve_device`, so the driver can import this without it.
"""
from __future__ import annotations

from pyspark import TaskContext


def task_gpu() -> str | None:
    """The GPU address Spark gave this task, when the cluster schedules GPUs (None elsewhere)."""
    ctx = TaskContext.get()
    if ctx is None:
        return None
    gpus = ctx.resources().get("gpu")
    return gpus.addresses[0] if gpus is not None and gpus.addresses else None


def task_cpus() -> int | None:
    """The CPUs Spark gave this task (None outside a Spark task)."""
    ctx = TaskContext.get()
    return int(ctx.cpus()) if ctx is not None else None


def resolve_device(device: str | None = None) -> str:
    """'auto'/None: this Spark task's GPU, else CUDA when present, else CPU; anything else is used as is.
    Call it where the model runs (a worker), never on the driver before workers start."""
    if device not in (None, "", "auto"):
        return device
    gpu = task_gpu()
    if gpu is not None:
        return f"cuda:{gpu}"
    import torch  # only where a model runs: the Spark driver imports this module without torch

    return "cuda" if torch.cuda.is_available() else "cpu"
