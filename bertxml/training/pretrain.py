"""Pre-training a BERT encoder from scratch on the notes (paper §3.2, §4.2.1): masked language model plus
next sentence prediction, with our own vocabulary and positions up to 1,024.

    bertxml pretrain [--size tiny|small|big] [--vocab DIR] [--corpus parquet:PATH ...] [--resume]

Reads the train split of `bertxml.chunks` (chunking cfg.pretrain.max_len, Delta version pinned and recorded)
and, optionally, unlabelled corpus SOURCEs (a `text` column; small, so chunked here in Python with the
same vocabulary). MLM masks 15% of the tokens, 80/10/10 mask/random/keep
(bertxml.models.pretraining.mask_tokens); NSP pairs come from each chunk's own sentence order (segment A = its
first k sentences, B = the sentences that follow, or half of the time sentences of another note: `nsp_example`
below). The loop stands on the toolkit of bertxml.training.loop: AdamW without decay on biases/LayerNorm,
warm-up then linear decay, accumulation, clipping, bf16 autocast where the hardware multiplies bf16 natively
(bertxml.models.precision), length-bucketed batches, resumable safetensors checkpoints.

Writes an encoder folder (default WORKDIR/models/encoder-<size>-<timestamp>): the Hugging Face checkpoint
(config.json + model.safetensors) that `bertxml train --encoder DIR` fine-tunes, tokenizer.json and
manifest.json (model_kind "encoder", dev MLM/NSP loss before and after).
"""
from __future__ import annotations

import logging
import math
import shutil
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from pyspark.sql.types import StringType, StructField, StructType

from bertxml.config import Config
from bertxml.models import modeldir
from bertxml.models.bert import bert_config, count_parameters
from bertxml.models.pretraining import BertForPretraining, mask_tokens
from bertxml.models.precision import autocast, decide_precision
from bertxml.platform import tables as t
from bertxml.platform.runs import job_run
from bertxml.text.data import ChunkSet, bucketed_batches, load_chunks, pad_ids
from bertxml.text.tokenize import chunk_notes
from bertxml.text.vocab import load_tokenizer
from bertxml.training.inputs import (ARCH_FIELDS, chunks_metadata, file_sha256, size_label, source_tables,
                                     special_ids, unfinished_model_dir)
from bertxml.training.loop import (CHECKPOINT_DIR, check_resume, load_checkpoint, make_optimizer, pick_device,
                                   planned_steps, run_steps, set_threads)

log = logging.getLogger("bertxml.training.pretrain")

NOT_NEXT, IS_NEXT = 1, 0  # transformers' BertForPreTraining: label 0 = B follows A, 1 = B is random
LOSSES = ("loss", "mlm_loss", "nsp_loss")  # the window means logged and kept in the history
LOG_FORMAT = ("step {step}/{total} epoch {epoch:.2f} loss {loss:.4f} (mlm {mlm_loss:.4f}, nsp {nsp_loss:.4f}) "
              "lr {lr:.2e} grad_norm {grad_norm:.2f} tokens/s {tokens_per_s:.0f}")


# ---- pre-training batches: next-sentence pairs and BERT's MLM masking -------------------------------------
def split_sentences(input_ids: np.ndarray, sentence_starts: np.ndarray) -> list[np.ndarray]:
    """A chunk `[CLS] body [SEP]` -> its body cut at the sentence starts (positions in input_ids).
    A piece that continues a sentence from the previous chunk counts as a sentence of its own."""
    body_end = len(input_ids) - 1  # the final [SEP]
    cuts = sorted({int(s) for s in sentence_starts if 1 < s < body_end} | {1})
    return [input_ids[a:b] for a, b in zip(cuts, cuts[1:] + [body_end]) if b > a]


def nsp_example(chunks: ChunkSet, i: int, rng: np.random.Generator, max_len: int, cls_id: int,
                sep_id: int) -> tuple[np.ndarray, np.ndarray, int]:
    """One next-sentence pair from chunk i: (input_ids, token_type_ids, label).

    Segment A is the chunk's first k sentences (k drawn from 1..n-1); segment B is, half of the time, the
    sentences that follow in the same chunk (label IS_NEXT), otherwise sentences from a random chunk of
    another note, from one of its sentence starts, no longer than the true continuation would have been
    (label NOT_NEXT) so that length gives nothing away. A chunk with a single sentence is cut at a random
    token instead. The pair is `[CLS] A [SEP] B [SEP]`, token types 0 for A and 1 for B, cut to max_len.
    """
    sentences = split_sentences(chunks.input_ids[i], chunks.sentence_starts[i])
    if len(sentences) >= 2:
        k = int(rng.integers(1, len(sentences)))
        seg_a, seg_b = np.concatenate(sentences[:k]), np.concatenate(sentences[k:])
    else:
        body = sentences[0] if sentences else np.zeros(0, dtype=np.int64)
        cut = int(rng.integers(1, len(body))) if len(body) >= 2 else len(body)
        seg_a, seg_b = body[:cut], body[cut:]
    label = IS_NEXT
    if rng.random() < 0.5 and chunks.n_notes > 1:
        for _ in range(10):  # another note's chunk; a few draws suffice unless one note dominates
            j = int(rng.integers(len(chunks)))
            if chunks.note_index[j] != chunks.note_index[i]:
                other = split_sentences(chunks.input_ids[j], chunks.sentence_starts[j])
                if other:
                    s = int(rng.integers(len(other)))
                    seg_b = np.concatenate(other[s:])[:max(1, len(seg_b))]
                    label = NOT_NEXT
                break
    budget = max_len - 3
    while len(seg_a) + len(seg_b) > budget:  # trim the longer segment's end, as BERT does
        if len(seg_a) > len(seg_b):
            seg_a = seg_a[:-1]
        else:
            seg_b = seg_b[:-1]
    ids = np.concatenate([[cls_id], seg_a, [sep_id], seg_b, [sep_id]]).astype(np.int64)
    types = np.concatenate([np.zeros(len(seg_a) + 2, dtype=np.int64), np.ones(len(seg_b) + 1, dtype=np.int64)])
    return ids, types, label


def pretraining_batch(chunks: ChunkSet, index: np.ndarray, *, nsp: bool, seed: int, step: int, max_len: int,
                      special: dict, vocab_size: int, mlm_probability: float) -> dict:
    """A pre-training batch for chunks `index`: next-sentence pairs (when nsp) and BERT's MLM masking.

    Randomness is drawn from generators seeded by (seed, step), so a batch is rebuilt identically after a
    resume. `special` holds the ids of pad, cls, sep and mask. Returns input_ids, attention_mask,
    token_type_ids (B, T), mlm_labels (B, T) (-100 where not masked) and nsp_labels (B,) or None.
    """
    rng = np.random.default_rng([seed, step, 1])
    if nsp:
        pairs = [nsp_example(chunks, int(i), rng, max_len, special["cls"], special["sep"]) for i in index]
        rows, types, nsp_labels = [p[0] for p in pairs], [p[1] for p in pairs], [p[2] for p in pairs]
    else:
        rows = [chunks.input_ids[i] for i in index]
        types = [np.zeros(len(r), dtype=np.int64) for r in rows]
        nsp_labels = None
    ids, mask = pad_ids(rows, special["pad"])
    token_types, _ = pad_ids(types, 0)
    special_mask = (mask == 0) | (ids == special["cls"]) | (ids == special["sep"])  # (B, T)
    generator = torch.Generator().manual_seed(int(np.random.default_rng([seed, step, 2]).integers(2**62)))
    masked, mlm_labels = mask_tokens(ids, special_mask, vocab_size, special["mask"], mlm_probability, generator)
    return {"input_ids": masked, "attention_mask": mask, "token_type_ids": token_types, "mlm_labels": mlm_labels,
            "nsp_labels": torch.tensor(nsp_labels, dtype=torch.long) if nsp_labels is not None else None}


def load_corpus_chunks(wh, specs, tokenizer, max_len: int) -> tuple[ChunkSet, dict]:
    """Unlabelled corpus SOURCEs (table name or parquet:/csv:/json:/delta:PATH with a `text` column) chunked
    with the tokenizer, sentence starts included. Returns (chunks, {source: version or None})."""
    schema = StructType([StructField("text", StringType())])
    note_ids, chunks, read = [], [], {}
    for n, spec in enumerate(specs):
        df, info = wh.read_source(spec, schema, "pretraining corpus")
        texts = [row[0] for row in df.collect() if row[0]]
        read[spec] = info["version"]
        note_ids += [f"corpus{n}:{i:07d}" for i in range(len(texts))]
        chunks += chunk_notes(tokenizer, texts, max_len)
        log.info("corpus %s: %d texts", spec, len(texts))
    return ChunkSet.from_notes(note_ids, chunks, [[] for _ in note_ids]), read


@torch.no_grad()
def pretraining_loss(model: BertForPretraining, chunks: ChunkSet, cfg: Config, special: dict, vocab_size: int,
                     device, precision, max_batches: int) -> dict:
    """Mean MLM/NSP loss over up to max_batches batches of chunks: a fixed random sample of batches (not
    the shortest chunks) with the same masks and pairs at every call, so before/after compare."""
    pc = cfg.pretrain
    if not len(chunks):
        return {}
    was_training = model.training
    model.eval()
    sums, n = {"loss": 0.0, "mlm_loss": 0.0, "nsp_loss": 0.0}, 0
    for b, index in enumerate(bucketed_batches(chunks.lengths, pc.batch_size, pc.seed + 1, 0)[:max_batches]):
        batch = pretraining_batch(chunks, index, nsp=pc.nsp, seed=pc.seed + 1, step=b, max_len=pc.max_len,
                                  special=special, vocab_size=vocab_size, mlm_probability=pc.mlm_probability)
        with autocast(device, precision):
            out = model(**{k: v.to(device) for k, v in batch.items() if v is not None})
        for key in sums:
            if key in out:
                sums[key] += float(out[key])
        n += 1
    model.train(was_training)
    return {key: round(value / n, 4) for key, value in sums.items() if value or key == "loss"}


def run_pretrain(wh, cfg: Config, vocab_dir: str | Path | None = None, out_dir: str | Path | None = None,
                 corpus_sources=(), resume: bool = False) -> Path:
    """Pre-train an encoder of cfg.model's shape from scratch; returns the encoder folder.

    vocab_dir: the vocabulary the chunks were made with (default WORKDIR/vocab). out_dir: default
    WORKDIR/models/encoder-<size>-<timestamp>; with resume=True and no out_dir, the newest interrupted one.
    """

    pc = cfg.pretrain
    vocab_dir = Path(vocab_dir) if vocab_dir else wh.workdir / "vocab"
    tokenizer = load_tokenizer(vocab_dir)
    if pc.max_len > cfg.model.max_position_embeddings:
        raise ValueError(f"pretrain.max_len {pc.max_len} exceeds model.max_position_embeddings "
                         f"{cfg.model.max_position_embeddings}")
    arch = {k: getattr(cfg.model, k) for k in ARCH_FIELDS}
    if resume and out_dir is None:
        out_dir = unfinished_model_dir(wh.workdir, "encoder")
    if out_dir is None:
        version, out_dir = modeldir.new_model_dir(wh.workdir, "encoder", size_label(arch))
    else:
        out_dir, version = Path(out_dir).resolve(), modeldir.model_version("encoder", size_label(arch))
    out_dir.mkdir(parents=True, exist_ok=True)

    with job_run(wh, "pretrain") as run:
        chunks_name, path, chunks_version = source_tables(wh, cfg)[t.CHUNKS]
        if chunks_version is None:
            raise FileNotFoundError(f"table {chunks_name} does not exist: run `bertxml tokenize` first")
        meta = chunks_metadata(path, chunks_version, pc.max_len)
        sha = file_sha256(Path(vocab_dir) / modeldir.TOKENIZER_FILE)
        if meta and meta.get("tokenizer_sha256") and meta["tokenizer_sha256"] != sha:
            raise ValueError(f"the chunks for max_len {pc.max_len} were made with another tokenizer than "
                             f"{vocab_dir}: run `bertxml tokenize --vocab {vocab_dir} --max-len {pc.max_len}`")
        run.inputs[chunks_name] = chunks_version
        train_set = ChunkSet.from_arrow(load_chunks(path, chunks_version, "train", pc.max_len))
        dev_set = ChunkSet.from_arrow(load_chunks(path, chunks_version, "dev", pc.max_len))
        if corpus_sources:
            corpus, read = load_corpus_chunks(wh, corpus_sources, tokenizer, pc.max_len)
            run.inputs.update(read)
            train_set = ChunkSet.concat([train_set, corpus])
        run.count("train_chunks", len(train_set))
        inputs = dict(run.inputs)
        encoder_dir = pretrain_model(train_set, dev_set, cfg, tokenizer, vocab_dir, out_dir, version, inputs, resume)
        run.outputs["encoder_dir"] = str(encoder_dir)
    return encoder_dir


def pretrain_model(train_set: ChunkSet, dev_set: ChunkSet, cfg: Config, tokenizer, vocab_dir: Path,
                   out_dir: Path, version: str, inputs: dict, resume: bool = False) -> Path:
    """The pre-training loop (one process) over chunk sets; writes the encoder folder and returns it."""
    pc = cfg.pretrain
    device = pick_device()
    set_threads(pc.threads, device)
    precision = decide_precision(device, pc.bf16)
    special, vocab_size = special_ids(tokenizer), tokenizer.get_vocab_size()
    if not len(train_set):
        raise ValueError("no train chunks to pre-train on")
    torch.manual_seed(pc.seed)
    model_cfg = replace(cfg.model, attention_probs_dropout_prob=pc.attention_dropout)
    model = BertForPretraining(bert_config(model_cfg, vocab_size, special["pad"]))
    model.init_mlm_bias(train_set.token_counts(vocab_size))
    model = model.to(device)
    optimizer = make_optimizer(model, pc.lr, pc.weight_decay)
    lengths = train_set.lengths + (1 if pc.nsp else 0)  # an NSP pair has one [SEP] more

    steps_per_epoch = math.ceil(len(bucketed_batches(lengths, pc.batch_size, pc.seed, 0, pc.bucket_window))
                                / pc.grad_accum)
    total_steps = planned_steps(pc.epochs, pc.max_steps, steps_per_epoch)
    plan = {"total_steps": total_steps, "steps_per_epoch": steps_per_epoch, "world_size": 1, "seed": pc.seed}
    ckpt_dir = out_dir / CHECKPOINT_DIR
    state = {"model_version": version, "step": 0, **plan, "history": [], "train_seconds": 0.0, "tokens": 0,
             "dev_initial": pretraining_loss(model, dev_set, cfg, special, vocab_size, device, precision, pc.dev_batches)}
    if resume:
        state = load_checkpoint(ckpt_dir, model, optimizer)
        check_resume(state, plan)
    started = time.perf_counter() - state["train_seconds"]
    log.info("%s: %d chunks, %d steps (%d per epoch, batch %d x %d), lr %.1e, %d parameters, precision %s", version,
             len(train_set), total_steps, steps_per_epoch, pc.batch_size, pc.grad_accum, pc.lr,
             count_parameters(model), precision)

    def micro_step(index: np.ndarray, step: int, k: int, n: int) -> tuple[dict, int]:
        # masks and NSP partners are drawn from (seed, micro-batch number): identical after a resume
        batch = pretraining_batch(train_set, index, nsp=pc.nsp, seed=pc.seed, step=step * pc.grad_accum + k,
                                  max_len=pc.max_len, special=special, vocab_size=vocab_size,
                                  mlm_probability=pc.mlm_probability)
        batch = {key: value.to(device) for key, value in batch.items() if value is not None}
        with autocast(device, precision):
            out = model(**batch)
        (out["loss"] / n).backward()
        # the losses stay on the device and are read at log time only: no GPU sync per micro-batch
        losses = {key: out[key].detach().float() / n for key in LOSSES if key in out}
        return losses, int(batch["attention_mask"].sum())

    run_steps(model, optimizer, state, pc, desc="pretrain", logger=log, log_format=LOG_FORMAT,
              epoch_batches=lambda epoch: bucketed_batches(lengths, pc.batch_size, pc.seed, epoch, pc.bucket_window),
              micro_step=micro_step, window_keys=LOSSES, history=("history", 4), ckpt_dir=ckpt_dir, started=started)

    dev = pretraining_loss(model, dev_set, cfg, special, vocab_size, device, precision, pc.dev_batches)
    model.save_encoder(out_dir)
    modeldir.write_model_dir(
        out_dir, model_version=state["model_version"], model_kind=modeldir.ENCODER_KIND, config=cfg.to_dict(),
        inputs=inputs, max_len=pc.max_len, dev_metrics={**dev, "initial": state["dev_initial"]},
        parameters=count_parameters(model), train_seconds=time.perf_counter() - started,
        tokenizer_file=Path(vocab_dir) / modeldir.TOKENIZER_FILE,
        extra={"steps": total_steps, "tokens": state["tokens"], "loss_history": state["history"],
               "precision": precision.to_dict(), "vocab_dir": str(vocab_dir), "tokenizer_sha256": file_sha256(Path(vocab_dir) / modeldir.TOKENIZER_FILE)})
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    log.info("encoder %s: dev loss %s -> %s -> %s", state["model_version"], state["dev_initial"].get("loss"),
             dev.get("loss"), out_dir)
    return out_dir
