"""The training loop's toolkit, shared by pretraining, fine-tuning and the BiGRU baseline: AdamW with
parameter groups (no decay on biases and LayerNorm, an optional faster group), the warm-up then linear
decay schedule, per-step dropout seeds, device and threads, DDP under torchrun or TorchDistributor,
checkpoints (weights and optimizer state as safetensors, counters as JSON; no pickle) and their resume
check, the dev selection score, and `run_steps`: the step loop itself (epochs of bucketed batches resumed
mid-epoch, accumulation, schedule, per-step seed, clipping, windowed loss logging, checkpoints), which
pretraining and fine-tuning drive with their own micro-batch step.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
import torch.distributed as dist
from tqdm import tqdm

from bertxml.metrics import fmt_metric
from bertxml.models import modeldir

log = logging.getLogger("bertxml.training.loop")


CHECKPOINT_DIR = "checkpoint"      # the resumable training state, removed when the run finishes
BEST_DIR = "best"                  # the weights with the best dev macro AUC so far


def lr_at(step: int, total_steps: int, lr: float, warmup: float) -> float:
    """Learning rate of optimizer step `step` (0-based) out of `total_steps` (paper §4.2.2): a linear rise
    over the first warmup * total_steps steps up to `lr`, then a linear decay reaching 0 at total_steps."""
    warmup_steps = int(round(warmup * total_steps))
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    return lr * max(0, total_steps - step) / max(1, total_steps - warmup_steps)


def planned_steps(epochs: float, max_steps: int, steps_per_epoch: int) -> int:
    """Optimizer steps of a run: epochs * steps_per_epoch (rounded up), capped by max_steps when > 0."""
    total = math.ceil(epochs * steps_per_epoch)
    if max_steps > 0:
        total = min(total, max_steps)
    if total < 1:
        raise ValueError(f"nothing to train: epochs={epochs}, max_steps={max_steps}, "
                         f"{steps_per_epoch} steps per epoch")
    return total


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, fast: list | None = None,
                   fast_scale: float = 1.0) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only: biases and LayerNorm weights (the 1-d tensors) are not
    decayed, as in BERT. The parameters in `fast` (a freshly initialised head) learn at fast_scale * lr;
    each group's "lr_scale" is applied by `set_lr`. PyTorch's fused kernel where the parameters' device
    has one (CPU and CUDA): the default per-tensor loop launches a few ops per parameter tensor, which
    dominates the step of a small model on a CPU."""
    fast_ids = {id(p) for p in fast or []}
    groups: dict[tuple, list] = {}  # (lr_scale, is a matrix) -> parameters, in model order
    for p in model.parameters():
        if p.requires_grad:
            groups.setdefault((fast_scale if id(p) in fast_ids else 1.0, p.ndim >= 2), []).append(p)
    groups = [{"params": params, "lr_scale": scale, "weight_decay": weight_decay if matrix else 0.0}
              for (scale, matrix), params in groups.items()]
    fused = all(p.device.type in ("cpu", "cuda") for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=lr, fused=fused)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """This step's learning rate on every group, times the group's lr_scale."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    """The torch seed of one optimizer step on one rank (dropout); a resumed run redraws the same masks."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])


def pick_device(local_rank: int = 0, use_gpu: bool | None = None) -> torch.device:
    """cuda:<local_rank> when CUDA is there (and use_gpu is not False), else the CPU."""
    if torch.cuda.is_available() and use_gpu is not False:
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def set_threads(threads: int, device: torch.device) -> None:
    """CPU threads for torch: `threads` when > 0; with several processes on one CPU host, its cores shared
    out (oversubscribed threads made steps many times slower on a small shared machine)."""
    if threads > 0:
        torch.set_num_threads(threads)
    elif device.type == "cpu" and int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["LOCAL_WORLD_SIZE"])))


def init_distributed(use_gpu: bool | None = None) -> tuple[int, int, int, bool]:
    """Join the process group when started by torchrun/TorchDistributor (WORLD_SIZE > 1 in the environment).

    Returns (rank, world_size, local_rank, created): `created` is True when this call made the group (and
    the caller should destroy it). One process: (0, 1, 0, False).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if world <= 1:
        return 0, 1, 0, False
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), local_rank, False
    backend = "nccl" if torch.cuda.is_available() and use_gpu is not False else "gloo"
    dist.init_process_group(backend=backend)
    log.info("process group: rank %d of %d (%s)", rank, world, backend)
    return rank, world, local_rank, True


def barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def broadcast_json(payload: str | None, world: int, device: torch.device) -> str:
    """Rank 0's JSON string on every rank (sent as bytes, not pickled)."""
    if world <= 1:
        return payload
    data = torch.tensor(list(payload.encode("utf-8")) if dist.get_rank() == 0 else [], dtype=torch.uint8)
    size = torch.tensor([data.numel()], dtype=torch.long, device=device)
    dist.broadcast(size, 0)
    buffer = torch.zeros(int(size.item()), dtype=torch.uint8, device=device)
    if dist.get_rank() == 0:
        buffer.copy_(data.to(device))
    dist.broadcast(buffer, 0)
    return bytes(buffer.cpu().tolist()).decode("utf-8")


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Optimizer state as ({"<param>.<name>": tensor}, JSON-able rest: param_groups and non-tensor state)."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, values in state["state"].items():
        for name, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{name}"] = value
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in state["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    """Inverse of `optimizer_tensors`."""
    state: dict = {}
    for key, value in [*tensors.items(), *meta["scalars"].items()]:
        pid, _, name = key.partition(".")
        state.setdefault(int(pid), {})[name] = value
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in meta["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def swap_dir(tmp: Path, final: Path) -> None:
    """Put a fully written folder in place of `final`; at every instant one complete copy exists."""
    old = final.with_name(final.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(ckpt_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> Path:
    """Write model.safetensors, optimizer.safetensors and state.json (step, history, seeds ...) to ckpt_dir."""
    tmp = ckpt_dir.with_name(ckpt_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    safetensors.torch.save_model(model, str(tmp / "model.safetensors"))
    tensors, meta = optimizer_tensors(optimizer)
    safetensors.torch.save_file(tensors, str(tmp / "optimizer.safetensors"))
    modeldir.write_json(tmp / "state.json", {**state, "optimizer": meta})
    swap_dir(tmp, ckpt_dir)
    log.info("checkpoint at step %d -> %s", state["step"], ckpt_dir)
    return ckpt_dir


def load_checkpoint(ckpt_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Restore weights and optimizer state from ckpt_dir (or its .old twin left by a crash mid-swap);
    returns the saved state dict. FileNotFoundError when there is none."""
    for folder in (ckpt_dir, ckpt_dir.with_name(ckpt_dir.name + ".old")):
        if (folder / "state.json").exists():
            break
    else:
        raise FileNotFoundError(f"no checkpoint to resume from in {ckpt_dir}")
    state = json.loads((folder / "state.json").read_text())
    safetensors.torch.load_model(model, str(folder / "model.safetensors"), strict=True)
    load_optimizer_tensors(optimizer, safetensors.torch.load_file(str(folder / "optimizer.safetensors")),
                           state.pop("optimizer"))
    log.info("resuming from step %d of %d (%s)", state["step"], state["total_steps"], folder)
    return state


def check_resume(saved: dict, expected: dict) -> None:
    """A checkpoint only continues the same plan: same steps, epoch length, processes and seed."""
    for key, value in expected.items():
        if saved.get(key) != value:
            raise ValueError(f"cannot resume: the checkpoint has {key}={saved.get(key)!r}, this run {value!r} "
                             f"(same data, config and number of processes needed)")


def selection_score(metrics: dict | None) -> float:
    """What "best on dev" compares: macro AUC (paper §4.2.2), micro AUC when no code has a macro AUC."""
    if metrics is None:
        return -math.inf
    for key in ("macro_auc", "micro_auc"):
        if metrics.get(key) is not None:
            return metrics[key]
    return -math.inf


def run_steps(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict, settings, *,
              epoch_batches: Callable[[int], list], micro_step: Callable[[np.ndarray, int, int, int], tuple[dict, int]],
              window_keys: tuple[str, ...], log_format: str, logger: logging.Logger, history: tuple[str, int],
              ckpt_dir: Path, started: float, raw: torch.nn.Module | None = None,
              after_step: Callable[[int], None] | None = None, rank: int = 0, world: int = 1,
              desc: str = "train") -> None:
    """Optimizer steps from state["step"] to state["total_steps"], updating `state` in place.

    settings: the config section (lr, warmup, seed, grad_accum, clip, log_every, checkpoint_every).
    Epoch e's micro-batches are epoch_batches(e), grad_accum of them a step; a resumed run starts at the
    micro-batch where the checkpoint's step ended. Each step: its learning rate, torch seeded from
    (seed, step, rank) (the same dropout after a resume), micro_step(index, step, k, n) for the step's k-th
    of n micro-batches (it runs forward and backward and returns ({key: loss already divided by n}, tokens)),
    clipping, the optimizer step. Every log_every steps and at the end, rank 0 logs
    `log_format.format(step=, total=, epoch=, lr=, grad_norm= (NaN without clipping), grad_norm_text=,
    tokens_per_s=, <window key>= mean loss)` and appends {"step", each window key rounded to history[1]
    digits, "tokens_per_s"} to state[history[0]]. Then after_step(step) (dev evaluation), then at each epoch
    end, every checkpoint_every steps and at the end, rank 0 writes the checkpoint of `raw` (default
    `model`; the module inside DDP). `model` is what is put in train mode; `started` the perf_counter
    origin of state["train_seconds"].
    """
    raw = raw if raw is not None else model
    total_steps, steps_per_epoch, accum = state["total_steps"], state["steps_per_epoch"], settings.grad_accum
    history_key, digits = history
    bar = tqdm(total=total_steps, initial=state["step"], desc=desc, unit="step",
               disable=rank != 0 or not sys.stderr.isatty())
    # window sums start at 0.0 and take what micro_step returns: Python floats or device tensors (a tensor is
    # read at log time only, so a GPU is not synchronised per micro-batch)
    window, window_steps, window_tokens, window_start = dict.fromkeys(window_keys, 0.0), 0, 0, time.perf_counter()
    while state["step"] < total_steps:
        epoch = state["step"] // steps_per_epoch
        batches = epoch_batches(epoch)
        for first in range((state["step"] - epoch * steps_per_epoch) * accum, len(batches), accum):
            step = state["step"]
            if step >= total_steps:
                break
            group = batches[first:first + accum]
            lr = lr_at(step, total_steps, settings.lr, settings.warmup)
            set_lr(optimizer, lr)
            torch.manual_seed(step_seed(settings.seed, step, rank))
            model.train()
            for k, index in enumerate(group):
                losses, tokens = micro_step(index, step, k, len(group))
                for key in window:
                    if key in losses:
                        window[key] = window[key] + losses[key]
                window_tokens += tokens
            grad_norm = torch.nn.utils.clip_grad_norm_(raw.parameters(), settings.clip) if settings.clip > 0 else None
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state["step"] = step = step + 1
            window_steps += 1
            bar.update(1)

            if rank == 0 and (step % settings.log_every == 0 or step == total_steps):
                elapsed = time.perf_counter() - window_start
                means = {key: float(value) / window_steps for key, value in window.items()}
                norm = float(grad_norm) if grad_norm is not None else None
                logger.info(log_format.format(
                    step=step, total=total_steps, epoch=step / steps_per_epoch, lr=lr,
                    grad_norm=norm if norm is not None else float("nan"), grad_norm_text=fmt_metric(norm, 2),
                    tokens_per_s=window_tokens / elapsed, **means))
                bar.set_postfix(loss=f"{means['loss']:.4f}", lr=f"{lr:.1e}")
                state[history_key].append({"step": step, **{key: round(value, digits) for key, value in means.items()},
                                           "tokens_per_s": round(window_tokens / elapsed)})
                state["tokens"] += window_tokens
                window, window_steps, window_tokens, window_start = dict.fromkeys(window_keys, 0.0), 0, 0, \
                    time.perf_counter()
            if after_step is not None:
                after_step(step)
            if step % steps_per_epoch == 0 or step == total_steps or \
                    (settings.checkpoint_every > 0 and step % settings.checkpoint_every == 0):
                if rank == 0:
                    state["train_seconds"] = time.perf_counter() - started
                    save_checkpoint(ckpt_dir, raw, optimizer, state)
                barrier(world)
    bar.close()
