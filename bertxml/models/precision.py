"""The compute precision of a device, decided in one place for every job that runs a model.

bf16 pays only where the hardware multiplies it natively: CUDA GPUs with bf16 support, and CPUs with
AVX512-BF16 or AMX (x86) or the BF16 extension (Arm). Elsewhere a CPU emulates bf16, and a bf16 matrix
product runs far slower than fp32 (`benchmarks/train.py` prints both peaks), so the `auto` setting means
fp32 there. Pretraining, fine-tuning, the neural baseline, scoring and explanations
all call `decide_precision`; `true`/`false` force the choice. What was chosen is logged and written to the
model folder's manifest (`precision`).

Two ways to use bf16, chosen by the caller: training autocasts (fp32 weights and optimizer state, bf16
matmuls); CPU scoring casts the weights to bf16 once (CPU autocast re-casts every weight on every pass).
"""
from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from bertxml.config import precision_setting

log = logging.getLogger("bertxml.models.precision")

# /proc/cpuinfo flags that mean native bf16 arithmetic: x86 (`flags`) and Arm (`Features`).
NATIVE_BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> frozenset[str]:
    """The first processor's feature flags (x86 `flags`, Arm `Features`); empty where unreadable."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        name, sep, value = line.partition(":")
        if sep and name.strip().lower() in ("flags", "features"):
            return frozenset(value.split())
    return frozenset()


def cpu_has_native_bf16(flags: frozenset[str] | set[str] | None = None) -> bool:
    """Whether a CPU with these flags (default: this machine's) multiplies bf16 natively."""
    return bool(NATIVE_BF16_CPU_FLAGS & set(cpu_flags() if flags is None else flags))


def cpu_capability() -> str:
    """torch's name for the vector unit its CPU kernels use here (e.g. 'AVX2', 'AVX512')."""
    return torch.backends.cpu.get_cpu_capability()


@dataclass(frozen=True)
class Precision:
    """What a job computes in on one device, and why."""
    dtype: torch.dtype          # torch.bfloat16 or torch.float32
    device: str                 # 'cpu', 'cuda', ...
    setting: str                # the config value it came from: 'auto', 'true' or 'false'
    reason: str                 # one phrase for the log and the manifest

    @property
    def bf16(self) -> bool:
        return self.dtype == torch.bfloat16

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The dtype for torch.autocast, or None for plain fp32."""
        return self.dtype if self.bf16 else None

    def to_dict(self) -> dict:
        return {"dtype": str(self.dtype).removeprefix("torch."), "device": self.device, "setting": self.setting,
                "reason": self.reason, "cpu_capability": cpu_capability()}

    def __str__(self) -> str:
        return f"{str(self.dtype).removeprefix('torch.')} on {self.device} ({self.setting}: {self.reason})"


def decide_precision(device: torch.device | str, setting="auto", *, flags=None,
                     cuda_bf16: bool | None = None) -> Precision:
    """The compute dtype for `device` under a config setting ('auto', true or false).

    auto: bf16 on CUDA that supports it and on CPUs with native bf16 (see NATIVE_BF16_CPU_FLAGS), fp32
    elsewhere. true/false force bf16/fp32. flags (a CPU's /proc/cpuinfo flags) and cuda_bf16 replace what
    this machine reports, for tests and for deciding on behalf of another machine.
    """
    device = torch.device(device)
    setting = precision_setting(setting)
    if setting == "false":
        return Precision(torch.float32, device.type, setting, "forced")
    if setting == "true":
        return Precision(torch.bfloat16, device.type, setting, "forced")
    if device.type == "cuda":
        native = torch.cuda.is_bf16_supported() if cuda_bf16 is None else cuda_bf16
        reason = "the GPU supports bf16" if native else "the GPU has no bf16"
    elif device.type == "cpu":
        native = cpu_has_native_bf16(flags)
        reason = (f"CPU with native bf16 (capability {cpu_capability()})" if native else
                  f"CPU without native bf16 (capability {cpu_capability()}; no "
                  f"{'/'.join(sorted(NATIVE_BF16_CPU_FLAGS))} flag), where bf16 is emulated and slow")
    else:
        native, reason = False, f"no bf16 rule for {device.type}"
    return Precision(torch.bfloat16 if native else torch.float32, device.type, setting, reason)


def autocast(device: torch.device | str, precision: Precision | None):
    """Mixed precision context for training: weights and optimizer stay fp32, matmuls run in bf16 when
    `precision` says so; a no-op for fp32."""
    if precision is None or not precision.bf16:
        return nullcontext()
    return torch.autocast(torch.device(device).type, dtype=precision.dtype)
