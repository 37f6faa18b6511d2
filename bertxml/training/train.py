"""Fine-tuning an ICD coding model: BERT-XML (label attention, paper §3.3.2) or BERT with the [CLS] head (§3.3.1).

    bertxml train [--size tiny|small|big] [--encoder DIR | --init DIR] [--resume]
    torchrun --nproc_per_node 2 -m bertxml.training.train --workdir WORKDIR [--size tiny] [...]

What it does (paper §4.2.2): reads the chunks of `bertxml.chunks` (one chunking, cfg.model.max_len) at a
Delta version pinned on the driver, trains on the train split with binary cross-entropy, AdamW with weight
decay (none on biases and LayerNorm), a linear warm-up over cfg.train.warmup of the steps then a linear
decay to 0, gradient accumulation and clipping, bf16 autocast where the hardware multiplies bf16 natively
(bertxml.models.precision), and length-bucketed
batches. A note's prediction is the max over its chunks (§4.1); dev macro/micro AUC is measured at each
epoch end (or every eval_every steps) and the checkpoint with the best dev macro AUC is kept. Per-code
thresholds are tuned on dev for maximum F1. The result is a model folder (bertxml.models.modeldir).

The encoder comes from our own pretraining (`encoder_dir`, bertxml.training.pretrain), from an off-the-shelf BERT
checkpoint (`init`, e.g. MiniLM: then the notes are chunked here with that checkpoint's own WordPiece vocabulary,
since the chunks table holds our vocabulary's ids), or is initialised at random.

A training checkpoint (weights and optimizer state as safetensors, counters as JSON; no pickle) is written
to OUT_DIR/checkpoint every cfg.train.checkpoint_every steps and at each epoch end; `resume=True` continues
from it. Batches are a function of (seed, epoch) and dropout is reseeded from (seed, step, rank) at every
step, so a resumed run ends with the same weights as an uninterrupted one.

Distributed data parallel: the same code runs under torchrun or Spark's TorchDistributor (each process
takes every world_size-th batch; only rank 0 evaluates and writes). The driver resolves all inputs (paths,
pinned versions, label vocabulary) into a `TrainInputs`; workers read Delta files with bertxml.platform.deltaread
and need no JVM.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tokenizers import Tokenizer
from tqdm import tqdm

from bertxml.scoring import drift
from bertxml.models import modeldir
from bertxml.platform import tables as t
from bertxml.config import CONF_DIR, Config, config_from_dict, load_config, load_yaml
from bertxml.text.data import (ChunkSet, bucketed_batches, coding_batch, eval_batches, load_chunks, pad_ids,
                          shard_batches, table_path)
from bertxml.metrics import auc_metrics, micro_f1
from bertxml.models.bert import (HEADS, BertForIcdCoding, bert_config, chunk_max, count_parameters,
                           from_pretrained_encoder, save_model)
from bertxml.models.precision import Precision, autocast, decide_precision

log = logging.getLogger("bertxml.training.train")

CHECKPOINT_DIR = "checkpoint"      # the resumable training state, removed when the run finishes
LABEL_INITS = ("description", "contextual", "random")  # model.label_init
BEST_DIR = "best"                  # the weights with the best dev macro AUC so far
ARCH_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")

# ---------------------------------------------------------------------------------------------------------
# Schedule, optimizer, precision


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
    has one (CPU and CUDA): the default per-tensor loop made the optimizer step ~2.7x slower on the small
    model on a 2-core CPU."""
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


# ---------------------------------------------------------------------------------------------------------
# Distributed data parallel


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


# ---------------------------------------------------------------------------------------------------------
# Checkpoints: safetensors for tensors, JSON for counters (torch.save would be a pickle)


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


def _swap_dir(tmp: Path, final: Path) -> None:
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
    _swap_dir(tmp, ckpt_dir)
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


# ---------------------------------------------------------------------------------------------------------
# Evaluation: note-level scores, AUCs, thresholds


@torch.no_grad()
def predict_notes(model: BertForIcdCoding, chunks: ChunkSet, batch_size: int, device: torch.device,
                  precision: Precision | None, pad_id: int) -> np.ndarray:
    """Note-level probabilities (n_notes, M): the max over each note's chunks (paper §4.1)."""
    was_training = model.training
    model.eval()
    scores = torch.empty(len(chunks), model.n_labels)  # (n_chunks, M) logits
    for index in eval_batches(chunks.lengths, batch_size):
        ids, mask = pad_ids([chunks.input_ids[i] for i in index], pad_id)  # (B, T)
        with autocast(device, precision):
            logits = model(ids.to(device), mask.to(device))["logits"]  # (B, M)
        scores[torch.from_numpy(index)] = logits.float().cpu()
    model.train(was_training)
    notes = chunk_max(scores, torch.from_numpy(chunks.note_index), chunks.n_notes)  # (n_notes, M)
    return torch.sigmoid(notes).numpy()


@torch.no_grad()
def encode_chunks(model: BertForIcdCoding, chunks: ChunkSet, batch_size: int, device: torch.device,
                  precision: Precision | None, pad_id: int) -> list[torch.Tensor]:
    """The encoder's last-layer states of every chunk, once: [(length_i, H) float32 on the CPU]. With a
    frozen encoder (train.freeze_encoder) these never change, so the head trains on them directly and an
    epoch costs no encoder pass at all."""
    was_training = model.training
    model.eval()
    states: list = [None] * len(chunks)
    for index in eval_batches(chunks.lengths, batch_size):
        ids, mask = pad_ids([chunks.input_ids[i] for i in index], pad_id)  # (B, T)
        with autocast(device, precision):
            hidden = model.bert(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
        hidden = hidden.float().cpu()  # (B, T, H)
        for row, i in enumerate(index):
            states[i] = hidden[row, :int(chunks.lengths[i])].clone()  # (length_i, H)
    model.train(was_training)
    return states


def pad_states(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Cached chunk states [(length_i, H)] -> (hidden (B, T, H), attention_mask (B, T)), right-padded."""
    width = max(int(r.shape[0]) for r in rows)
    hidden = torch.zeros(len(rows), width, rows[0].shape[1])
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for k, r in enumerate(rows):
        hidden[k, :r.shape[0]] = r
        mask[k, :r.shape[0]] = 1
    return hidden, mask


@torch.no_grad()
def predict_notes_cached(model: BertForIcdCoding, chunks: ChunkSet, states: list[torch.Tensor], batch_size: int,
                         device: torch.device) -> np.ndarray:
    """`predict_notes` from cached encoder states (frozen encoder): only the head runs."""
    was_training = model.training
    model.eval()
    scores = torch.empty(len(chunks), model.n_labels)  # (n_chunks, M) logits
    for index in eval_batches(chunks.lengths, batch_size):
        hidden, mask = pad_states([states[i] for i in index])
        scores[torch.from_numpy(index)] = model.head(hidden.to(device), mask.to(device)).float().cpu()
    model.train(was_training)
    notes = chunk_max(scores, torch.from_numpy(chunks.note_index), chunks.n_notes)  # (n_notes, M)
    return torch.sigmoid(notes).numpy()


def tune_thresholds(probs: np.ndarray, labels: np.ndarray, default: float = 0.5) -> np.ndarray:
    """Per code, the probability threshold (predict code when p >= threshold) with the highest F1 on these
    notes; `default` for a code with no positive note. Returns (M,) float32."""
    out = np.full(labels.shape[1], default, dtype=np.float32)
    for j in np.flatnonzero(labels.sum(axis=0) > 0):
        order = np.argsort(-probs[:, j], kind="stable")
        scores, hits = probs[order, j], labels[order, j]
        tp = np.cumsum(hits)  # true positives when the top k+1 notes are predicted
        f1 = 2 * tp / (np.arange(1, len(scores) + 1) + hits.sum())
        f1[:-1][scores[:-1] == scores[1:]] = -1  # only cut between different scores
        out[j] = scores[int(np.argmax(f1))]
    return out


def _cut(scores: np.ndarray, tp: np.ndarray, k: int, positives: int) -> dict:
    """The operating point of predicting the top k+1 notes: threshold scores[k], precision and recall."""
    return {"threshold": float(scores[k]), "precision": float(tp[k] / (k + 1)), "recall": float(tp[k] / positives)}


def operating_points(probs: np.ndarray, labels: np.ndarray, codes: list[str], f1_thresholds: np.ndarray,
                     auto_precision: float = 0.9, review_recall: float = 0.9, min_support: int = 10) -> dict:
    """Per code, from dev probabilities (n, M) and labels (n, M): the operating points the review bands use.

    - "f1": the F1-max threshold (`tune_thresholds`), with the precision and recall it has on these notes;
    - "auto": the LOWEST threshold whose precision reaches auto_precision (the most recall at that
      precision); None when no cut reaches it;
    - "review": the HIGHEST threshold whose recall reaches review_recall (the fewest notes to read for it);
    - "support": the notes with the code.
    Thresholds are cut only between different scores, as in `tune_thresholds`. A code with fewer than
    min_support positive notes gets no "auto" and no "review" (too rare to estimate a band: every
    prediction of it goes to review, at its F1 threshold). Returns a JSON-ready dict:
    {"targets": {...}, "codes": {code: {"support", "f1", "auto", "review"}}}.
    """
    out = {}
    for j, code in enumerate(codes):
        positives = int(labels[:, j].sum())
        point = {"support": positives, "f1": None, "auto": None, "review": None}
        out[code] = point
        if positives == 0:
            continue
        hit = probs[:, j] >= np.float32(f1_thresholds[j])
        tp_f1 = int((hit & (labels[:, j] > 0)).sum())
        point["f1"] = {"threshold": float(f1_thresholds[j]), "precision": tp_f1 / max(int(hit.sum()), 1),
                       "recall": tp_f1 / positives}
        if positives < min_support:
            continue
        order = np.argsort(-probs[:, j], kind="stable")
        scores, hits = probs[order, j], labels[order, j] > 0
        tp = np.cumsum(hits)  # true positives when the top k+1 notes are predicted
        valid = np.ones(len(scores), dtype=bool)
        valid[:-1] = scores[:-1] != scores[1:]  # only cut between different scores
        k = np.arange(len(scores))
        precise = np.flatnonzero(valid & (tp >= auto_precision * (k + 1) - 1e-9))
        if len(precise):
            point["auto"] = _cut(scores, tp, int(precise[-1]), positives)
        enough = np.flatnonzero(valid & (tp >= review_recall * positives - 1e-9))
        point["review"] = _cut(scores, tp, int(enough[0]), positives)
    return {"targets": {"auto_precision": auto_precision, "review_recall": review_recall,
                        "min_support": min_support, "measured_on": "dev", "notes": int(labels.shape[0])},
            "codes": out}


def selection_score(metrics: dict | None) -> float:
    """What "best on dev" compares: macro AUC (paper §4.2.2), micro AUC when no code has a macro AUC."""
    if metrics is None:
        return -math.inf
    for key in ("macro_auc", "micro_auc"):
        if metrics.get(key) is not None:
            return metrics[key]
    return -math.inf


# ---------------------------------------------------------------------------------------------------------
# Inputs: resolved on the driver, plain values a worker can receive


@dataclass
class TrainInputs:
    """Everything a training process needs, resolved once on the driver (JSON-able)."""
    workdir: str
    out_dir: str
    model_version: str
    model_kind: str
    max_len: int
    labels: list                         # label_vocab rows in label_index order
    tokenizer_file: str
    versions: dict                       # {qualified table name: Delta version read}
    labeled_notes_path: str
    labeled_notes_version: int
    chunks_path: str | None = None       # None: notes are chunked here (an `init` checkpoint's own vocabulary)
    chunks_version: int | None = None
    encoder_dir: str | None = None
    init: str | None = None
    extra: dict = field(default_factory=dict)
    drift_profile: dict | None = None    # the training set's input statistics (bertxml.scoring.drift.training_profile)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainInputs":
        return cls(**data)


def size_label(arch: dict) -> str:
    """'tiny'/'small'/'big' when the architecture matches a conf/model preset, else e.g. 'h384-l6'."""
    for path in sorted((CONF_DIR / "model").glob("*.yaml")):
        preset = load_yaml(path)
        if all(preset.get(k) == arch.get(k) for k in ARCH_FIELDS):
            return path.stem
    return f"h{arch.get('hidden_size')}-l{arch.get('num_hidden_layers')}"


def init_tokenizer(init_dir: str | Path) -> Tokenizer:
    """The WordPiece tokenizer of an off-the-shelf BERT checkpoint folder (tokenizer.json, else vocab.txt
    as uncased BERT), with truncation and padding switched off: a Hub tokenizer.json often carries e.g.
    MiniLM's 128-token truncation, which would silently cut every note."""
    init_dir = Path(init_dir)
    if (init_dir / "tokenizer.json").exists():
        tokenizer = Tokenizer.from_file(str(init_dir / "tokenizer.json"))
    elif (init_dir / "vocab.txt").exists():
        from bertxml.text.vocab import load_reference_tokenizer

        tokenizer = load_reference_tokenizer(init_dir / "vocab.txt")
    else:
        raise FileNotFoundError(f"{init_dir} has neither tokenizer.json nor vocab.txt")
    tokenizer.no_truncation()
    tokenizer.no_padding()
    for token in ("[PAD]", "[CLS]", "[SEP]"):
        if tokenizer.token_to_id(token) is None:
            raise ValueError(f"the tokenizer of {init_dir} has no {token} token: not a BERT WordPiece vocabulary")
    return tokenizer


def file_sha256(path: str | Path) -> str:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def chunks_metadata(path: str | Path, version: int, max_len: int) -> dict | None:
    """userMetadata of the newest commit (at or before `version`) that wrote the chunks of this max_len:
    bertxml.text.tokenize records the tokenizer's sha256 there. Read from the Delta log JSON, no JVM."""
    log_dir = Path(path) / "_delta_log"
    for v in range(int(version), -1, -1):
        commit = log_dir / f"{v:020d}.json"
        if not commit.exists():
            return None  # older commits were cleaned up after a checkpoint
        for line in commit.read_text().splitlines():
            info = json.loads(line).get("commitInfo") if line.strip() else None
            if info and info.get("userMetadata"):
                try:
                    meta = json.loads(info["userMetadata"])
                except json.JSONDecodeError:
                    continue
                if meta.get("max_len") == max_len:
                    return meta
    return None


def etl_lineage(source, name: str, path: str | None, version: int | None) -> dict | None:
    """The ETL run that wrote this version of labeled_notes and what it read: {"run_id", "inputs": {"notes":
    {"source", "version", ...}, "diagnoses": {...}}}, from the lineage bertxml.etl.etl leaves in the commit's
    userMetadata (a Warehouse asks it; a workdir's Delta log is read as JSON, no JVM). None when the commit
    holds none (a table written by something else, or a commit file cleaned up after a checkpoint)."""
    if version is None:
        return None
    if hasattr(source, "spark"):
        meta = source.commit_metadata(name, version)
    else:
        commit = Path(path) / "_delta_log" / f"{int(version):020d}.json"
        infos = [json.loads(line).get("commitInfo") for line in commit.read_text().splitlines()
                 if line.strip()] if commit.exists() else []
        text = next((i.get("userMetadata") for i in infos if i and i.get("userMetadata")), None)
        try:
            meta = json.loads(text) if text else None
        except json.JSONDecodeError:
            meta = None
    if not isinstance(meta, dict) or not meta.get("run_id"):
        return None
    return {"run_id": meta["run_id"], "inputs": meta.get("inputs") or {}}


def source_tables(source, cfg: Config) -> dict:
    """{short: (qualified name, Delta folder, version)} for the tables training reads, from a Warehouse or a
    path-mode workdir. Path mode reads the latest versions from the Delta logs (no Spark job needed);
    a metastore warehouse asks Spark for versions and locations."""
    from bertxml.platform.deltaread import latest_version

    out = {}
    for short in (t.LABELED_NOTES, t.LABEL_VOCAB, t.CHUNKS):
        name = f"{cfg.warehouse.schema}.{short}"
        if hasattr(source, "spark") and not source.path_mode:
            version = source.version(name)
            path = source.spark.sql(f"DESCRIBE DETAIL {name}").first()["location"] if version is not None else None
        else:
            path = source.path(name) if hasattr(source, "spark") else table_path(source, cfg.warehouse.schema, short)
            version = latest_version(path) if (Path(path) / "_delta_log").exists() else None
        out[short] = (name, str(path) if version is not None else None, version)
    return out


def _read_label_vocab(source, name: str, path: str, version: int) -> list[dict]:
    if hasattr(source, "spark"):  # the driver's Spark, once; workers get the list
        rows = [r.asDict() for r in source.table(name, version=version).orderBy("label_index").collect()]
    else:
        from bertxml.platform.deltaread import read_delta

        rows = sorted(read_delta(path, version).to_pylist(), key=lambda r: r["label_index"])
    labels = [{k: row.get(k) for k in modeldir.LABEL_FIELDS} for row in rows]
    if [r["label_index"] for r in labels] != list(range(len(labels))):
        raise ValueError(f"{name} version {version}: label_index is not 0..{len(labels) - 1}")
    if not labels:
        raise ValueError(f"{name} version {version} is empty: lower etl.min_code_count or add notes")
    return labels


def unfinished_model_dir(workdir, model_kind: str) -> Path:
    """The newest folder under WORKDIR/models with a checkpoint and no manifest (a run that stopped)."""
    root = modeldir.models_root(workdir)
    candidates = [p.parent.parent for p in root.glob(f"{model_kind}-*/{CHECKPOINT_DIR}*/state.json")
                  if not (p.parent.parent / modeldir.MANIFEST_FILE).exists()]
    if not candidates:
        raise FileNotFoundError(f"no interrupted {model_kind} run to resume under {root}")
    return max(candidates, key=lambda p: p.stat().st_mtime)


def resolve_train_inputs(source, cfg: Config, model_kind: str = "bertxml", init: str | Path | None = None,
                         encoder_dir: str | Path | None = None, vocab_dir: str | Path | None = None,
                         out_dir: str | Path | None = None, resume: bool = False) -> TrainInputs:
    """Pin what a training run reads: table versions (now), the label vocabulary, the tokenizer, the
    output folder. `source` is a Warehouse (Spark on the driver) or a path-mode workdir (no JVM).

    Tokenizer: encoder_dir/tokenizer.json (our pretraining copies it there) or vocab_dir/tokenizer.json
    (default WORKDIR/vocab) with the chunks table; with `init`, the checkpoint's own vocabulary, and the
    notes of labeled_notes are chunked in the worker (bertxml.text.tokenize.chunk_notes) instead of read from
    the chunks table, which holds our vocabulary's ids.
    """
    if model_kind not in HEADS:
        raise ValueError(f"unknown model_kind {model_kind!r}; choose one of {HEADS}")
    if init and encoder_dir:
        raise ValueError("give either init (an off-the-shelf BERT) or encoder_dir (our pretraining), not both")
    workdir = Path(source.workdir if hasattr(source, "spark") else source).resolve()
    tables = source_tables(source, cfg)
    for short, (name, path, version) in tables.items():
        if version is None and not (short == t.CHUNKS and init):
            job = "tokenize" if short == t.CHUNKS else "etl"
            raise FileNotFoundError(f"table {name} does not exist: run `bertxml {job}` first")
    vocab_name, vocab_path, vocab_version = tables[t.LABEL_VOCAB]
    labels = _read_label_vocab(source, vocab_name, vocab_path, vocab_version)
    max_len = int(cfg.model.max_len)

    arch = {k: getattr(cfg.model, k) for k in ARCH_FIELDS}
    source_dir = Path(init or encoder_dir) if (init or encoder_dir) else None
    if source_dir is not None:
        if not (source_dir / "config.json").exists():
            raise FileNotFoundError(f"{source_dir} has no config.json: not a BERT checkpoint folder")
        arch = json.loads((source_dir / "config.json").read_text())
    if resume and out_dir is None:
        out_dir = unfinished_model_dir(workdir, model_kind)
    if out_dir is None:
        version, out_dir = modeldir.new_model_dir(workdir, model_kind, size_label(arch))
    else:
        out_dir, version = Path(out_dir).resolve(), modeldir.model_version(model_kind, size_label(arch))
    out_dir.mkdir(parents=True, exist_ok=True)

    versions = {name: v for name, _, v in tables.values() if v is not None}
    notes_name, notes_path, notes_version = tables[t.LABELED_NOTES]
    inputs = TrainInputs(workdir=str(workdir), out_dir=str(out_dir), model_version=version, model_kind=model_kind,
                         max_len=max_len, labels=labels, tokenizer_file="", versions=versions,
                         labeled_notes_path=notes_path, labeled_notes_version=notes_version,
                         encoder_dir=str(encoder_dir) if encoder_dir else None, init=str(init) if init else None)
    meta = None
    if init:
        # The checkpoint's vocabulary, saved (no truncation) as the model's tokenizer.json for scoring.
        tokenizer_file = out_dir / modeldir.TOKENIZER_FILE
        init_tokenizer(init).save(str(tokenizer_file))
        inputs.tokenizer_file = str(tokenizer_file)
        versions.pop(tables[t.CHUNKS][0], None)
    else:
        candidates = ([Path(encoder_dir) / modeldir.TOKENIZER_FILE] if encoder_dir else []) + \
                     [Path(vocab_dir or workdir / "vocab") / modeldir.TOKENIZER_FILE]
        tokenizer_file = next((p for p in candidates if p.exists()), None)
        if tokenizer_file is None:
            raise FileNotFoundError(f"no tokenizer.json in {[str(p.parent) for p in candidates]}: "
                                    "run `bertxml vocab` first")
        inputs.tokenizer_file = str(tokenizer_file)
        _, inputs.chunks_path, inputs.chunks_version = tables[t.CHUNKS]
        meta = chunks_metadata(inputs.chunks_path, inputs.chunks_version, max_len)
        sha = file_sha256(tokenizer_file)
        if meta and meta.get("tokenizer_sha256") and meta["tokenizer_sha256"] != sha:
            raise ValueError(f"the chunks for max_len {max_len} were made with another tokenizer "
                             f"({meta['tokenizer_sha256'][:12]}) than {tokenizer_file} ({sha[:12]}): "
                             "run `bertxml tokenize` with this vocabulary")
    inputs.extra["tokenizer_sha256"] = file_sha256(inputs.tokenizer_file)
    # The training set's notes: the labeled_notes version the chunks were made from (tokenize records it),
    # or the one read here for an `init` checkpoint.
    trained_notes = notes_version
    if inputs.chunks_path and meta and meta.get("labeled_notes_version") is not None:
        trained_notes = int(meta["labeled_notes_version"])
        if trained_notes != notes_version:
            log.warning("the chunks for max_len %d were made from %s version %d, not its latest (%d): run "
                        "`bertxml tokenize` to train on the latest ETL", max_len, notes_name, trained_notes,
                        notes_version)
    lineage = etl_lineage(source, notes_name, notes_path, trained_notes)
    inputs.extra["etl_run"] = {**lineage, "labeled_notes_version": trained_notes} if lineage else None
    inputs.drift_profile = drift.training_profile(
        source, cfg, tokenizer_file=inputs.tokenizer_file, labeled_notes_path=notes_path,
        labeled_notes_version=trained_notes, codes=[row["code"] for row in labels], etl_run=lineage, max_len=max_len)
    read = {r.get("source"): r.get("version") for r in (lineage or {}).get("inputs", {}).values()}
    log.info("training inputs: %s; written by etl run %s from %s; %d labels; tokenizer %s; out %s", versions,
             (lineage or {}).get("run_id", "-"), read or "-", len(labels), inputs.tokenizer_file, out_dir)
    return inputs


def load_split(inputs: TrainInputs, split: str, tokenizer: Tokenizer) -> ChunkSet:
    """One split's chunks: from the chunks table at the pinned version, or (init checkpoints) chunked here
    from labeled_notes with the checkpoint's tokenizer."""
    if inputs.chunks_path:
        return ChunkSet.from_arrow(load_chunks(inputs.chunks_path, inputs.chunks_version, split, inputs.max_len))
    import pyarrow.compute as pc

    from bertxml.platform.deltaread import read_delta
    from bertxml.text.tokenize import chunk_notes

    notes = read_delta(inputs.labeled_notes_path, inputs.labeled_notes_version,
                       columns=["note_id", "split", "text", "codes"])
    notes = notes.filter(pc.equal(notes["split"], split))
    code_index = {row["code"]: row["label_index"] for row in inputs.labels}
    label_ids = [sorted({code_index[c] for c in codes or [] if c in code_index})
                 for codes in notes["codes"].to_pylist()]
    chunks = chunk_notes(tokenizer, notes["text"].to_pylist(), inputs.max_len)
    return ChunkSet.from_notes(notes["note_id"].to_pylist(), chunks, label_ids)


def special_ids(tokenizer: Tokenizer) -> dict:
    """Ids of the BERT special tokens in this tokenizer (ours: 0-4; off-the-shelf BERT: 0, 100-103)."""
    return {name: tokenizer.token_to_id(token) for name, token in
            (("pad", "[PAD]"), ("unk", "[UNK]"), ("cls", "[CLS]"), ("sep", "[SEP]"), ("mask", "[MASK]"))}


def build_model(inputs: TrainInputs, cfg: Config, tokenizer: Tokenizer) -> BertForIcdCoding:
    """The model to fine-tune: encoder from encoder_dir / init or random; head from cfg.model.head; label
    vectors from the code descriptions when cfg.model.label_init == "description" (paper §3.3.2)."""
    torch.manual_seed(cfg.train.seed)
    special = special_ids(tokenizer)
    n_labels = len(inputs.labels)
    source = inputs.encoder_dir or inputs.init
    if source:
        model = from_pretrained_encoder(source, cfg.model, n_labels,
                                        max_position_embeddings=max(cfg.model.max_position_embeddings, inputs.max_len))
    else:
        model = BertForIcdCoding(bert_config(cfg.model, tokenizer.get_vocab_size(), special["pad"]), n_labels,
                                 head=cfg.model.head)
    if model.config.vocab_size < tokenizer.get_vocab_size():
        raise ValueError(f"the encoder knows {model.config.vocab_size} tokens, the tokenizer "
                         f"{tokenizer.get_vocab_size()}: they come from different vocabularies")
    if cfg.model.label_init not in LABEL_INITS:
        raise ValueError(f"unknown model.label_init {cfg.model.label_init!r}; choose one of {LABEL_INITS}")
    if cfg.model.head == "bertxml" and cfg.model.label_init != "random":
        descriptions = [tokenizer.encode(row.get("description") or "").ids for row in inputs.labels]
        skip = [special["cls"], special["sep"], special["pad"]]
        if cfg.model.label_init == "contextual":
            model.init_label_embeddings_contextual(descriptions, skip_ids=skip)
        else:
            model.init_label_embeddings(descriptions, skip_ids=skip)
    return model


def resolved_config(cfg: Config, inputs: TrainInputs) -> Config:
    """A copy of cfg saying what was trained: the head of model_kind, the chunk length."""
    out = config_from_dict(cfg.to_dict())
    out.model.head = inputs.model_kind
    out.model.max_len = inputs.max_len
    return out


# ---------------------------------------------------------------------------------------------------------
# The training loop


def train_model(inputs: TrainInputs, cfg: Config, resume: bool = False, use_gpu: bool | None = None) -> Path:
    """Fine-tune on inputs' train split, select on dev, write the model folder. One process or one rank of
    a DDP group (torchrun/TorchDistributor environment). Returns the model folder (on every rank)."""
    cfg = resolved_config(cfg, inputs)
    tc = cfg.train
    rank, world, local_rank, created_group = init_distributed(use_gpu)
    device = pick_device(local_rank, use_gpu)
    set_threads(tc.threads, device)
    out_dir = Path(inputs.out_dir)
    tokenizer = Tokenizer.from_file(inputs.tokenizer_file)
    pad_id = special_ids(tokenizer)["pad"]
    n_labels = len(inputs.labels)

    train_set, dev_set = load_split(inputs, "train", tokenizer), load_split(inputs, "dev", tokenizer)
    if not len(train_set):
        raise ValueError("no train chunks: check the chunks table and the split fractions")
    dev_labels = dev_set.note_labels(n_labels)
    if rank == 0:
        log.info("train: %d notes, %d chunks; dev: %d notes, %d chunks; %d labels; max_len %d",
                 train_set.n_notes, len(train_set), dev_set.n_notes, len(dev_set), n_labels, inputs.max_len)

    raw = build_model(inputs, cfg, tokenizer).to(device)
    for key in ARCH_FIELDS + ("max_position_embeddings",):  # the manifest states the trained architecture
        setattr(cfg.model, key, getattr(raw.config, key))
    frozen = bool(tc.freeze_encoder)
    if frozen:
        if world > 1:
            raise ValueError("train.freeze_encoder trains the head on cached encoder states: one process only")
        for p in raw.bert.parameters():
            p.requires_grad = False
    model = raw
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            raw, device_ids=[local_rank] if device.type == "cuda" else None)
    if not resume:
        raw.init_output_bias(train_set.label_rates(n_labels))
    optimizer = make_optimizer(raw, tc.lr, tc.weight_decay, fast=raw.head_parameters(), fast_scale=tc.head_lr_scale)
    precision = decide_precision(device, tc.bf16)
    train_states = dev_states = None
    if frozen:
        cache_started = time.perf_counter()
        train_states = encode_chunks(raw, train_set, tc.eval_batch_size, device, precision, pad_id)
        dev_states = encode_chunks(raw, dev_set, tc.eval_batch_size, device, precision, pad_id) \
            if len(dev_set) else []
        if rank == 0:
            log.info("frozen encoder: states of %d train and %d dev chunks cached in %.0f s", len(train_set),
                     len(dev_set), time.perf_counter() - cache_started)

    def epoch_batches(epoch: int) -> list[np.ndarray]:
        return shard_batches(bucketed_batches(train_set.lengths, tc.batch_size, tc.seed, epoch, tc.bucket_window),
                             rank, world)

    steps_per_epoch = math.ceil(len(epoch_batches(0)) / tc.grad_accum)
    total_steps = planned_steps(tc.epochs, tc.max_steps, steps_per_epoch)
    plan = {"total_steps": total_steps, "steps_per_epoch": steps_per_epoch, "world_size": world, "seed": tc.seed}
    state = {"model_version": inputs.model_version, "step": 0, **plan, "history": [], "best": None,
             "loss_history": [], "train_seconds": 0.0, "tokens": 0}
    ckpt_dir = out_dir / CHECKPOINT_DIR
    if resume:
        state = load_checkpoint(ckpt_dir, raw, optimizer)
        check_resume(state, plan)
    started = time.perf_counter() - state["train_seconds"]
    if rank == 0:
        log.info("%s: %d steps (%d per epoch, batch %d x %d accumulation x %d processes), lr %.1e, precision %s",
                 inputs.model_version, total_steps, steps_per_epoch, tc.batch_size, tc.grad_accum, world, tc.lr, precision)

    def evaluate_and_select(step: int) -> None:
        """Rank 0: dev AUCs; keep the weights when dev macro AUC is the best so far."""
        if not dev_set.n_notes:
            return
        probs = predict_notes_cached(raw, dev_set, dev_states, tc.eval_batch_size, device) if frozen else \
            predict_notes(raw, dev_set, tc.eval_batch_size, device, precision, pad_id)
        metrics = {**auc_metrics(probs, dev_labels), "step": step, "epoch": round(step / steps_per_epoch, 3)}
        state["history"].append(metrics)
        improved = selection_score(metrics) > selection_score(state["best"])
        if improved:
            state["best"] = metrics
            tmp = out_dir / (BEST_DIR + ".tmp")
            save_model(raw, tmp)
            _swap_dir(tmp, out_dir / BEST_DIR)
        log.info("dev at step %d: macro AUC %s, micro AUC %s%s", step, fmt_metric(metrics["macro_auc"]),
                 fmt_metric(metrics["micro_auc"]), " (best so far)" if improved else "")

    bar = tqdm(total=total_steps, initial=state["step"], desc="train", unit="step",
               disable=rank != 0 or not sys.stderr.isatty())
    lengths = train_set.lengths
    # the loss is summed on the device and read at log time only: no GPU sync per micro-batch
    window_loss, window_steps, window_tokens, window_start = torch.zeros((), device=device), 0, 0, time.perf_counter()
    while state["step"] < total_steps:
        epoch = state["step"] // steps_per_epoch
        batches = epoch_batches(epoch)
        for first in range((state["step"] - epoch * steps_per_epoch) * tc.grad_accum, len(batches), tc.grad_accum):
            step = state["step"]
            if step >= total_steps:
                break
            group = batches[first:first + tc.grad_accum]
            lr = lr_at(step, total_steps, tc.lr, tc.warmup)
            set_lr(optimizer, lr)
            torch.manual_seed(step_seed(tc.seed, step, rank))
            model.train()
            for k, index in enumerate(group):
                batch = coding_batch(train_set, index, n_labels, pad_id)  # (B, T) ids and mask, (B, M) labels
                batch = {key: value.to(device) for key, value in batch.items()}
                # DDP all-reduces gradients on the last micro-batch of the step only
                sync = nullcontext() if world == 1 or k == len(group) - 1 else model.no_sync()
                with sync:
                    with autocast(device, precision):
                        if frozen:  # the head on the cached states: the encoder is not run
                            hidden, _ = pad_states([train_states[i] for i in index])  # (B, T, H)
                            logits = raw.head(hidden.to(device), batch["attention_mask"])  # (B, M)
                            loss = F.binary_cross_entropy_with_logits(logits.float(), batch["labels"]) / len(group)
                        else:
                            loss = model(**batch)["loss"] / len(group)
                    loss.backward()
                window_loss += loss.detach().float()
                window_tokens += int(lengths[index].sum()) * world
            grad_norm = torch.nn.utils.clip_grad_norm_(raw.parameters(), tc.clip) if tc.clip > 0 else None
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state["step"] = step = step + 1
            window_steps += 1
            bar.update(1)

            if rank == 0 and (step % tc.log_every == 0 or step == total_steps):
                elapsed = time.perf_counter() - window_start
                log.info("step %d/%d epoch %.2f loss %.4f lr %.2e grad_norm %s tokens/s %.0f", step, total_steps,
                         step / steps_per_epoch, float(window_loss) / window_steps, lr,
                         fmt_metric(float(grad_norm) if grad_norm is not None else None, 2), window_tokens / elapsed)
                bar.set_postfix(loss=f"{float(window_loss) / window_steps:.4f}", lr=f"{lr:.1e}")
                state["loss_history"].append({"step": step, "loss": round(float(window_loss) / window_steps, 5),
                                              "tokens_per_s": round(window_tokens / elapsed)})
                state["tokens"] += window_tokens
                window_loss, window_steps, window_tokens, window_start = torch.zeros((), device=device), 0, 0, \
                    time.perf_counter()

            end_of_epoch = step % steps_per_epoch == 0 or step == total_steps
            if (tc.eval_every > 0 and step % tc.eval_every == 0) or (tc.eval_every <= 0 and end_of_epoch) \
                    or step == total_steps:
                if rank == 0:
                    evaluate_and_select(step)
                barrier(world)
            if end_of_epoch or (tc.checkpoint_every > 0 and step % tc.checkpoint_every == 0):
                if rank == 0:
                    state["train_seconds"] = time.perf_counter() - started
                    save_checkpoint(ckpt_dir, raw, optimizer, state)
                barrier(world)
    bar.close()

    if rank == 0:
        finish_model_dir(raw, inputs, cfg, state, dev_set, dev_labels, device, precision, pad_id,
                         time.perf_counter() - started)
    barrier(world)
    if created_group:
        dist.destroy_process_group()
    return out_dir


def finish_model_dir(model: BertForIcdCoding, inputs: TrainInputs, cfg: Config, state: dict, dev_set: ChunkSet,
                     dev_labels: np.ndarray, device, precision, pad_id: int, train_seconds: float) -> Path:
    """Best dev weights -> model.safetensors; dev thresholds; manifest. Removes best/ and checkpoint/."""
    out_dir = Path(inputs.out_dir)
    best_weights = out_dir / BEST_DIR / "model.safetensors"
    if state["best"] is not None and best_weights.exists():
        safetensors.torch.load_model(model, str(best_weights), strict=True)
    codes = [row["code"] for row in inputs.labels]
    thresholds = np.full(len(codes), cfg.score.threshold_default, dtype=np.float32)
    dev_metrics: dict = {"notes": 0}
    probs = None
    points = None
    if dev_set.n_notes:
        probs = predict_notes(model, dev_set, cfg.train.eval_batch_size, device, precision, pad_id)
        thresholds = tune_thresholds(probs, dev_labels, cfg.score.threshold_default)
        points = operating_points(probs, dev_labels, codes, thresholds, cfg.bands.auto_precision,
                                  cfg.bands.review_recall, cfg.bands.min_support)
        dev_metrics = {**auc_metrics(probs, dev_labels), "micro_f1": micro_f1(probs, dev_labels, thresholds)}
    dev_metrics.update(best_step=(state["best"] or {}).get("step"), history=state["history"])
    save_model(model, out_dir)
    extra = {"steps": state["total_steps"], "world_size": state["world_size"], "tokens": state["tokens"],
             "loss_history": state["loss_history"], "precision": precision.to_dict(),
             "encoder_dir": inputs.encoder_dir, "init": inputs.init, **inputs.extra}
    modeldir.write_model_dir(out_dir, model_version=state["model_version"], model_kind=inputs.model_kind,
                             config=cfg.to_dict(), inputs=inputs.versions, max_len=inputs.max_len,
                             dev_metrics=dev_metrics, parameters=count_parameters(model),
                             train_seconds=train_seconds, tokenizer_file=inputs.tokenizer_file,
                             label_vocab=inputs.labels,
                             thresholds={code: float(th) for code, th in zip(codes, thresholds)},
                             operating_points=points, extra=extra,
                             drift_profile=drift.add_dev_reference(inputs.drift_profile, codes, probs, thresholds))
    for folder in (BEST_DIR, CHECKPOINT_DIR):
        shutil.rmtree(out_dir / folder, ignore_errors=True)
    log.info("model %s: dev macro AUC %s, micro AUC %s (step %s) -> %s", state["model_version"],
             fmt_metric(dev_metrics.get("macro_auc")), fmt_metric(dev_metrics.get("micro_auc")), dev_metrics["best_step"], out_dir)
    return out_dir


def fmt_metric(value, digits: int = 4) -> str:
    """A metric for a log line or a report: 'n/a' when there is none (e.g. no dev code with a positive note)."""
    return "n/a" if value is None or value != value else f"{value:.{digits}f}"  # value != value: NaN


# ---------------------------------------------------------------------------------------------------------
# Entry points


def run_train(wh, cfg: Config, model_kind: str = "bertxml", init: str | Path | None = None,
              out_dir: str | Path | None = None, encoder_dir: str | Path | None = None,
              vocab_dir: str | Path | None = None, resume: bool = False, job: str = "train") -> Path:
    """Train a model_kind ("bertxml" | "cls") ICD coding model in this process (or as one rank under
    torchrun); returns the model folder (default WORKDIR/models/<model_version>). Recorded in job_runs
    and, with cfg.mlflow.log_runs, logged to MLflow and registered (`bertxml.models.registry`; `job` tags the run)."""
    from bertxml.models.registry import log_job_model
    from bertxml.platform.runs import job_run

    with job_run(wh, job) as run:
        inputs = resolve_train_inputs(wh, cfg, model_kind, init, encoder_dir, vocab_dir, out_dir, resume)
        run.inputs.update(inputs.versions)
        model_dir = train_model(inputs, cfg, resume=resume)
        if (model_dir / modeldir.MANIFEST_FILE).exists():
            manifest = modeldir.load_manifest(model_dir)
            run.outputs["model_dir"] = str(model_dir)
            run.count("dev_macro_auc", manifest["dev_metrics"].get("macro_auc"))
            run.count("train_seconds", manifest["train_seconds"])
            log_job_model(run, wh, cfg, model_dir, job)
    return model_dir


def distributed_worker(inputs: dict, cfg: dict, resume: bool = False, use_gpu: bool | None = None) -> str:
    """One TorchDistributor process: rebuild the plain inputs and train as one rank. Module-level, so it
    is sent to the workers by reference."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    return str(train_model(TrainInputs.from_dict(inputs), config_from_dict(cfg), resume=resume, use_gpu=use_gpu))


def run_train_distributed(source, cfg: Config, num_processes: int, use_gpu: bool = False,
                          model_kind: str = "bertxml", init: str | Path | None = None,
                          encoder_dir: str | Path | None = None, vocab_dir: str | Path | None = None,
                          out_dir: str | Path | None = None, resume: bool = False, local_mode: bool = True) -> Path:
    """Train with `num_processes` DDP processes started by Spark's TorchDistributor.

    `source` is a Warehouse or a path-mode workdir. Inputs (paths, pinned versions, label vocabulary) are
    resolved here on the driver; the workers get them as plain values and read the Delta files without a
    JVM. Returns the model folder.
    """
    from pyspark.ml.torch.distributor import TorchDistributor

    inputs = resolve_train_inputs(source, cfg, model_kind, init, encoder_dir, vocab_dir, out_dir, resume)
    distributor = TorchDistributor(num_processes=num_processes, local_mode=local_mode, use_gpu=use_gpu)
    result = distributor.run(distributed_worker, inputs.to_dict(), cfg.to_dict(), resume, use_gpu)
    return Path(result or inputs.out_dir)


def main(argv: list[str] | None = None) -> int:
    """`python -m bertxml.training.train` / `torchrun -m bertxml.training.train`: train from a path-mode workdir, no Spark."""
    parser = argparse.ArgumentParser(prog="bertxml.training.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="warehouse")
    parser.add_argument("--conf", action="append", default=[])
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--size", choices=sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml")))
    parser.add_argument("--model-kind", default="bertxml", choices=HEADS)
    parser.add_argument("--init", help="an off-the-shelf BERT checkpoint folder (e.g. MiniLM)")
    parser.add_argument("--encoder", help="an encoder folder from `bertxml pretrain`")
    parser.add_argument("--vocab", help="vocabulary folder (default WORKDIR/vocab)")
    parser.add_argument("--out-dir")
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    cfg = load_config(args.conf, args.set, args.size)
    rank, world, local_rank, created = init_distributed()
    payload = None
    if rank == 0:
        payload = json.dumps(resolve_train_inputs(Path(args.workdir), cfg, args.model_kind, args.init, args.encoder,
                                                  args.vocab, args.out_dir, args.resume).to_dict())
    payload = broadcast_json(payload, world, pick_device(local_rank))
    out = train_model(TrainInputs.from_dict(json.loads(payload)), cfg, resume=args.resume)
    if created:
        dist.destroy_process_group()
    if rank == 0:
        print(json.dumps({"model_dir": str(out)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
