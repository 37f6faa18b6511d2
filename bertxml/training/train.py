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
import json
import logging
import math
import shutil
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
import torch.distributed as dist
import torch.nn.functional as F
from pyspark.ml.torch.distributor import TorchDistributor
from tokenizers import Tokenizer

from bertxml.config import CONF_DIR, Config
from bertxml.config_io import config_from_dict, load_config
from bertxml.etl.icd import label_texts
from bertxml.metrics import auc_metrics, fmt_metric, micro_f1
from bertxml.models import modeldir, profile
from bertxml.models.bert import (BertForIcdCoding, HEADS, bert_config, chunk_max, count_parameters,
                                 from_pretrained_encoder, save_model)
from bertxml.models.precision import Precision, autocast, decide_precision
from bertxml.models.registry import log_job_model
from bertxml.platform.runs import job_run
from bertxml.text.data import ChunkSet, bucketed_batches, coding_batch, eval_batches, pad_ids, shard_batches
from bertxml.training.inputs import (ARCH_FIELDS, LABEL_INITS, TrainInputs, load_split,
                                     resolve_train_inputs, special_ids)
from bertxml.training.loop import (BEST_DIR, CHECKPOINT_DIR, barrier, broadcast_json, check_resume, init_distributed,
                                   load_checkpoint, make_optimizer, pick_device, planned_steps, run_steps,
                                   selection_score, set_threads, swap_dir)
from bertxml.training.thresholds import operating_points, tune_thresholds

log = logging.getLogger("bertxml.training.train")
LOG_FORMAT = ("step {step}/{total} epoch {epoch:.2f} loss {loss:.4f} lr {lr:.2e} grad_norm {grad_norm_text} "
              "tokens/s {tokens_per_s:.0f}")


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
            hidden = model.token_states(ids.to(device), mask.to(device))
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


# ---------------------------------------------------------------------------------------------------------
# Inputs: resolved on the driver, plain values a worker can receive


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
        if cfg.model.encoder_layers:
            raise ValueError("model.encoder_layers cuts a pretrained encoder (train.init or --encoder); an encoder "
                             "trained from scratch takes its depth from model.num_hidden_layers")
        model = BertForIcdCoding(bert_config(cfg.model, tokenizer.get_vocab_size(), special["pad"]), n_labels,
                                 head=cfg.model.head, label_output=cfg.model.label_output,
                                 state_layers=cfg.model.state_layers)
    if model.config.vocab_size < tokenizer.get_vocab_size():
        raise ValueError(f"the encoder knows {model.config.vocab_size} tokens, the tokenizer "
                         f"{tokenizer.get_vocab_size()}: they come from different vocabularies")
    if cfg.model.label_init not in LABEL_INITS:
        raise ValueError(f"unknown model.label_init {cfg.model.label_init!r}; choose one of {LABEL_INITS}")
    if cfg.model.head == "bertxml" and cfg.model.label_init != "random":
        texts = label_texts(inputs.labels, cfg.model.label_text)
        descriptions = [tokenizer.encode(text).ids for text in texts]
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
            swap_dir(tmp, out_dir / BEST_DIR)
        log.info("dev at step %d: macro AUC %s, micro AUC %s%s", step, fmt_metric(metrics["macro_auc"]),
                 fmt_metric(metrics["micro_auc"]), " (best so far)" if improved else "")

    def micro_step(index: np.ndarray, step: int, k: int, n: int) -> tuple[dict, int]:
        batch = coding_batch(train_set, index, n_labels, pad_id)  # (B, T) ids and mask, (B, M) labels
        batch = {key: value.to(device) for key, value in batch.items()}
        # DDP all-reduces gradients on the last micro-batch of the step only
        sync = nullcontext() if world == 1 or k == n - 1 else model.no_sync()
        with sync:
            with autocast(device, precision):
                if frozen:  # the head on the cached states: the encoder is not run
                    hidden, _ = pad_states([train_states[i] for i in index])  # (B, T, H)
                    logits = raw.head(hidden.to(device), batch["attention_mask"])  # (B, M)
                    loss = F.binary_cross_entropy_with_logits(logits.float(), batch["labels"]) / n
                else:
                    loss = model(**batch)["loss"] / n
            loss.backward()
        # the loss stays on the device and is read at log time only: no GPU sync per micro-batch
        return {"loss": loss.detach().float()}, int(train_set.lengths[index].sum()) * world

    def after_step(step: int) -> None:
        end_of_epoch = step % steps_per_epoch == 0 or step == total_steps
        if (tc.eval_every > 0 and step % tc.eval_every == 0) or (tc.eval_every <= 0 and end_of_epoch) \
                or step == total_steps:
            if rank == 0:
                evaluate_and_select(step)
            barrier(world)

    run_steps(model, optimizer, state, tc, raw=raw, rank=rank, world=world, desc="train", logger=log,
              log_format=LOG_FORMAT, epoch_batches=epoch_batches, micro_step=micro_step, window_keys=("loss",),
              history=("loss_history", 5), after_step=after_step, ckpt_dir=ckpt_dir, started=started)

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
                             drift_profile=profile.add_dev_reference(inputs.drift_profile, codes, probs, thresholds))
    for folder in (BEST_DIR, CHECKPOINT_DIR):
        shutil.rmtree(out_dir / folder, ignore_errors=True)
    log.info("model %s: dev macro AUC %s, micro AUC %s (step %s) -> %s", state["model_version"],
             fmt_metric(dev_metrics.get("macro_auc")), fmt_metric(dev_metrics.get("micro_auc")), dev_metrics["best_step"], out_dir)
    return out_dir


# ---------------------------------------------------------------------------------------------------------
# Entry points


def run_train(wh, cfg: Config, model_kind: str = "bertxml", init: str | Path | None = None,
              out_dir: str | Path | None = None, encoder_dir: str | Path | None = None,
              vocab_dir: str | Path | None = None, resume: bool = False, job: str = "train") -> Path:
    """Train a model_kind ("bertxml" | "cls") ICD coding model in this process (or as one rank under
    torchrun); returns the model folder (default WORKDIR/models/<model_version>). Recorded in job_runs
    and, with cfg.mlflow.log_runs, logged to MLflow and registered (`bertxml.models.registry`; `job` tags the run)."""

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
    inputs = resolve_train_inputs(source, cfg, model_kind, init, encoder_dir, vocab_dir, out_dir, resume)
    distributor = TorchDistributor(num_processes=num_processes, local_mode=local_mode, use_gpu=use_gpu)
    result = distributor.run(distributed_worker, inputs.to_dict(), cfg.to_dict(), resume, use_gpu)
    return Path(result or inputs.out_dir)


def main(argv: list[str] | None = None) -> int:
    """`python -m bertxml.training.train` / `torchrun -m bertxml.training.train`: train from a path-mode
    workdir, no Spark."""
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
