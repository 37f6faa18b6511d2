"""The Spark side of scoring: an iterator pandas UDF (`mapInPandas`) over notes whose Python worker builds
its predictor once and keeps it (`worker_predictor`), takes its GPU from the task's resources, and returns
each note's probabilities, top codes, predicted codes and bands, and evidence (`score_notes`).
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pandas as pd
from pyspark.sql import types as T

from bertxml.config import ScoreConfig, score_options
from bertxml.models.devices import resolve_device, task_cpus
from bertxml.models.modeldir import ScoredNotes, predicted_bands, top_codes
from bertxml.platform import faults, tables as t
from bertxml.scoring.predictors import make_predict_fn, read_model_info

log = logging.getLogger("bertxml.scoring.udf")


SCORE_COLUMNS = ("n_chunks", "truncated", "reason", "probabilities", "top_codes", "predicted_codes",
                 "predicted_bands", "evidence")


# ---- the worker side of the UDF ------------------------------------------------------------------------------
_WORKER_PREDICTORS: dict[tuple, Callable] = {}


def worker_predictor(model_dir: str, device: str, options: dict) -> Callable:
    """This Python worker's predictor for model_dir, built on first use and kept: Spark reuses a worker
    for many tasks and batches, so the model loads once per worker. Device and threads are decided here,
    in the worker (the task's GPU; threads = the task's CPUs unless set)."""
    options = dict(options)
    if not options.get("num_threads"):
        options["num_threads"] = task_cpus()
        if options["num_threads"] == 1:
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    device = resolve_device(device)
    key = (str(model_dir), device, tuple(sorted(options.items())))
    if key not in _WORKER_PREDICTORS:
        for old in [k for k in _WORKER_PREDICTORS if k[0] == key[0]]:
            del _WORKER_PREDICTORS[old]  # same model on another device: free it first
        started = time.perf_counter()
        _WORKER_PREDICTORS[key] = make_predict_fn(model_dir, device, **options)
        log.info("worker pid %d loaded %s on %s in %.1fs", os.getpid(), model_dir, device,
                 time.perf_counter() - started)
    return _WORKER_PREDICTORS[key]


def score_frames(frames: Iterator, model_dir: str, device: str, options: dict, top_k: int,
                 out_columns: list[str]) -> Iterator:
    """mapInPandas body: frames of notes (with `text`) -> frames of the other columns + SCORE_COLUMNS.

    A note with no token after normalisation gets reason 'no_tokens' and no probabilities. `evidence` is
    the engine's (`BertScorer.score` with evidence_top_k > 0), null for a model or options without it.
    """
    predict = info = codes = None
    batches = 0
    for frame in frames:
        if len(frame) == 0:
            continue
        batches += 1
        if batches == 2:
            faults.point("score:udf")
        if predict is None:  # on the first notes: a task with an empty partition never loads the model
            predict = worker_predictor(model_dir, device, options)
            info = getattr(predict, "info", None) or read_model_info(model_dir, options.get("threshold_default", 0.5))
            codes = np.array(info.codes, dtype=object)
        texts = frame["text"].tolist()
        if hasattr(predict, "score"):
            scored = predict.score(texts)
        else:  # a baseline predictor: probabilities only
            scored = ScoredNotes(probs=np.asarray(predict(texts), dtype=np.float32),
                                 n_chunks=np.ones(len(texts), dtype=np.int64),
                                 n_tokens=np.full(len(texts), -1), truncated=np.zeros(len(texts), dtype=bool))
        probs = scored.probs
        empty = scored.n_tokens == 0
        out = frame.drop(columns=["text"])
        out["n_chunks"] = scored.n_chunks.astype("int32")
        out["truncated"] = scored.truncated.astype(bool)
        out["reason"] = np.where(empty, "no_tokens", None)
        tops, (hits, bands) = top_codes(probs, codes, top_k), predicted_bands(probs, info)
        out["probabilities"] = [None if e else p for e, p in zip(empty, probs)]
        out["top_codes"] = [None if e else x for e, x in zip(empty, tops)]
        out["predicted_codes"] = [None if e else x for e, x in zip(empty, hits)]
        out["predicted_bands"] = [None if e else x for e, x in zip(empty, bands)]
        spans = scored.evidence if scored.evidence is not None else [None] * len(texts)
        out["evidence"] = [None if e else x for e, x in zip(empty, spans)]
        yield pd.DataFrame(out, columns=out_columns)


def scored_schema(df_schema):
    """Output schema of `score_notes`: df's columns without `text`, then SCORE_COLUMNS."""
    fields = [f for f in df_schema.fields if f.name != "text"]
    return T.StructType(fields + [
        T.StructField("n_chunks", T.IntegerType()),
        T.StructField("truncated", T.BooleanType()),
        T.StructField("reason", T.StringType()),
        T.StructField("probabilities", T.ArrayType(T.FloatType(), False)),
        T.StructField("top_codes", T.ArrayType(t.TOP_CODE)),
        T.StructField("predicted_codes", T.ArrayType(T.StringType())),
        T.StructField("predicted_bands", T.ArrayType(T.StringType())),
        T.StructField("evidence", T.ArrayType(t.EVIDENCE_SPAN)),
    ])


def score_notes(notes, model_dir: str | Path, cfg: ScoreConfig, partitions: int | None = None):
    """DataFrame of notes (`text` + any columns to carry along) -> DataFrame of those columns plus
    n_chunks, truncated, reason ('no_tokens' or null), probabilities, top_codes, predicted_codes, evidence
    (ARRAY<tables.EVIDENCE_SPAN>; null unless cfg.evidence and a label-attention model).

    The notes are spread over `partitions` (default cfg.partitions or the cluster's parallelism) so
    every task slot scores. Set spark.sql.execution.arrow.maxRecordsPerBatch (see `arrow_batch_conf`)
    around the action that runs it.
    """
    model_dir = str(Path(model_dir).resolve())
    schema = scored_schema(notes.schema)
    out_columns = [f.name for f in schema.fields]
    options, device, top_k = score_options(cfg), cfg.device, cfg.top_k
    n_parts = partitions or cfg.partitions or notes.sparkSession.sparkContext.defaultParallelism

    def score(frames):
        yield from score_frames(frames, model_dir, device, options, top_k, out_columns)

    return notes.repartition(n_parts).mapInPandas(score, schema=schema)


class arrow_batch_conf:
    """`with arrow_batch_conf(spark, n):` sets spark.sql.execution.arrow.maxRecordsPerBatch = n notes
    (about 9 KB of float32 probabilities per note for 2,292 codes) and restores the previous value."""

    KEY = "spark.sql.execution.arrow.maxRecordsPerBatch"

    def __init__(self, spark, notes_per_batch: int):
        self.spark, self.n = spark, int(notes_per_batch)

    def __enter__(self):
        self.old = self.spark.conf.get(self.KEY, None)
        self.spark.conf.set(self.KEY, str(self.n))
        return self

    def __exit__(self, *exc):
        if self.old is None:
            self.spark.conf.unset(self.KEY)
        else:
            self.spark.conf.set(self.KEY, self.old)
