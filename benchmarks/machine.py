"""What a benchmark ran on, and the matmul peak its MFU is measured against (shared by the benchmarks).

    .venv/bin/python benchmarks/machine.py     # one line: the CPU, its capability, what `auto` picks

The peak is measured in the dtype a run actually uses (`bertxml.models.precision.decide_precision`): on a CPU
without native bf16 the bf16 peak is a hundred times below fp32, and MFU against the wrong peak misleads.
"""
from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import torch

from bertxml.models.precision import cpu_flags, cpu_has_native_bf16, decide_precision


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_machine() -> str:
    """One line: the CPU, torch's capability, native bf16 and what `auto` precision picks here."""
    native = sorted(cpu_flags() & {"avx512_bf16", "amx_bf16", "bf16"})
    line = (f"CPU {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__} capability "
            f"{torch.backends.cpu.get_cpu_capability()}, native bf16: "
            f"{'yes (' + ', '.join(native) + ')' if cpu_has_native_bf16() else 'no'}; "
            f"auto precision on the CPU: {_name(decide_precision('cpu').dtype)}")
    if torch.cuda.is_available():
        line += f"; GPU {torch.cuda.get_device_name()} (auto: {_name(decide_precision('cuda').dtype)})"
    return line


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def precisions_to_time(device: torch.device | str, choice: str) -> list[str]:
    """The precisions a benchmark times: what the jobs pick on this device ('auto'), one forced, or both."""
    if choice == "both":
        return ["fp32", "bf16"]
    if choice == "auto":
        return ["bf16" if decide_precision(device).bf16 else "fp32"]
    return [choice]


def matmul_peak(dtype: torch.dtype, device: torch.device | str = "cpu", seconds: float = 1.0) -> tuple[float, float]:
    """Best FLOP/s of repeated n x n matmuls in dtype, by the wall clock and (CPU) by CPU time per thread.

    n = 8192 on a GPU, 2048 on a CPU, 512 for bf16 on a CPU that emulates it (at ~0.4 GFLOP/s a 2048
    product would take most of a minute).
    """
    device = torch.device(device)
    if device.type == "cuda":
        n = 8192
    else:
        n = 2048 if dtype != torch.bfloat16 or cpu_has_native_bf16() else 512
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b  # warm-up
    best_wall = best_cpu = 0.0
    deadline = time.perf_counter() + seconds
    while True:
        sync(device)
        wall, cpu = time.perf_counter(), time.process_time()
        a @ b
        sync(device)
        wall, cpu = time.perf_counter() - wall, (time.process_time() - cpu) / torch.get_num_threads()
        best_wall = max(best_wall, 2 * n ** 3 / wall)
        best_cpu = max(best_cpu, 2 * n ** 3 / max(cpu if device.type == "cpu" else wall, 1e-9))
        if time.perf_counter() >= deadline:
            return best_wall, best_cpu


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


if __name__ == "__main__":
    print(describe_machine())
