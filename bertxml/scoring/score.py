"""Nightly scoring: the notes of one day through a trained model into `bertxml.predictions`.

    bertxml score [--date YYYY-MM-DD | --since-last] [--model DIR | --model models:/bertxml@champion] [--notes SOURCE]

With neither --date nor --since-last the job scores YESTERDAY (UTC). `--since-last` rescores, night by night,
every night holding a note this model version has neither scored nor rejected: the catch-up after missed
nights. `--model` takes a folder or a registered model (`models:/bertxml@champion`, `models:/bertxml/3`:
`bertxml.models.registry`); it defaults to score.model_dir, else the registry's `champion` alias where there is a
registry, else the newest trained model under WORKDIR/models. The model version, label vocabulary,
thresholds and tokenizer travel with the folder, so two model versions (a champion and a challenger) are
scored side by side: `bertxml.predictions` is keyed by model_version.

What a run does, each table written in ONE Delta transaction:
1. reads the notes SOURCE (default `cfg.warehouse.notes`, schema-checked) for the night, and applies the
   ETL's filters (`bertxml.etl.etl.note_reject_reason`, duplicate ids) plus one of its own, 'bad_text'
   (invalid UTF-8, a NUL character, or more than `score.max_replacement_share` U+FFFD characters: the
   feed's decoding already failed). Such notes go to `bertxml.rejects` (job 'score', batch = the note's
   date, rewritten with replaceWhere so a rerun never duplicates), never to the model;
2. scores the rest through an iterator pandas UDF (`mapInPandas`, `bertxml.scoring.udf`) whose Python worker loads
   the model ONCE (`bertxml.scoring.predictors.make_predict_fn`, cached per process), takes its GPU from
   `TaskContext.resources()["gpu"]` when the cluster schedules GPUs, starts CUDA there and never on the driver, and
   autocasts to bf16 on a GPU that supports it (`bertxml.models.precision`);
3. replaces this model version's rows of the night in `bertxml.predictions` (partitioned by note_date) with
   the notes scored now, in one transaction (replaceWhere model_version and note_date): a note since marked
   erroneous, rejected or gone from the source loses its old row, and a rerun leaves the night's rows as one
   clean run would, whatever an earlier run left. Each predicted code carries a band (`predicted_bands`:
   'auto' at or above the code's auto-accept threshold, else 'review'). The model's label
   vocabulary and operating points are merged into `bertxml.model_labels` on (model_version, label_index);
4. recomputes the encounters of the nights' notes from all their notes' predictions and MERGEs them into
   `bertxml.encounter_predictions` (`bertxml.scoring.encounters`), and the analyst views are refreshed;
5. with `score.evidence` (the default) and a label-attention model, replaces the same nights' rows of
   `bertxml.evidence` the same way: for each predicted code of each note its `score.evidence_top_k` most
   attended spans, as character offsets into the note (never its text), computed by the engine in the
   pass that gives the probabilities (`predicted_attention`, `evidence_spans`).

Bad input, and what happens to it:
- empty, short, dropped or duplicated notes: rejected with the ETL's reason;
- undecodable text: rejected 'bad_text' before the UDF (invalid UTF-8 would otherwise fail the Arrow
  transfer of the whole batch, and with it the night);
- a note with no token left after normalisation: rejected 'no_tokens';
- a note longer than `score.max_chunks_per_note` chunks: SCORED ON ITS FIRST max_chunks_per_note CHUNKS,
  flagged `predictions.truncated = true` and counted (`notes_truncated`). A prediction from the first
  16K tokens is more use to a coder than none, and the flag says it is partial; the cap bounds a worker's
  time and memory on a runaway note (the text is also cut at `max_chunks * max_len * 64` characters
  before tokenisation);
- a model folder whose label_vocab.json disagrees with its weights' number of labels, or that lacks a
  file: a `ModelDirError` naming the folder and the problem, on the driver, before any note is read.

On a GPU cluster set, through `spark.conf` in the config: `spark.executor.resource.gpu.amount`,
`spark.task.resource.gpu.amount` (e.g. 1) and a discovery script; local mode needs nothing.
"""
from __future__ import annotations

import datetime as dt
import logging
import time
from pathlib import Path

from pyspark import StorageLevel
from pyspark.sql import functions as F

from bertxml.config import Config, ScoreConfig
from bertxml.etl.etl import dedupe_notes, note_reject_reason, reject_rows
from bertxml.models.modeldir import ModelInfo
from bertxml.models.registry import resolve_model
from bertxml.platform import tables as t
from bertxml.platform.runs import job_run
from bertxml.platform.views import create_views
from bertxml.platform.warehouse import sql_string
from bertxml.scoring.drift import run_night_drift
from bertxml.scoring.encounters import write_encounter_predictions
from bertxml.scoring.predictors import read_model_info
from bertxml.scoring.udf import arrow_batch_conf, score_notes

log = logging.getLogger("bertxml.scoring.score")


class NoNotesError(RuntimeError):
    """A night with no notes at all in the source: most likely the feed has not landed yet."""




# ---- the nightly job ---------------------------------------------------------------------------------------
def bad_text_reason(cfg: ScoreConfig):
    """'bad_text' for text the feed could not decode: invalid UTF-8, a NUL character, or more than
    cfg.max_replacement_share of U+FFFD replacement characters; null otherwise."""
    text = F.col("text")
    n = F.length(text)
    replaced = n - F.length(F.regexp_replace(text, "\ufffd", ""))
    return (F.when(text.isNull(), F.lit(None))
            .when(~F.is_valid_utf8(text), "bad_text")
            .when(text.contains("\x00"), "bad_text")
            .when(replaced > F.lit(cfg.max_replacement_share) * n, "bad_text"))


def flag_notes(notes, cfg: Config):
    """Input-schema notes -> the same with a `reason` (null = score it): the ETL's filters and duplicate
    rule (`bertxml.etl.etl`), then 'bad_text'."""
    flagged = notes.withColumn("reason", F.coalesce(note_reject_reason(cfg.etl), bad_text_reason(cfg.score)))
    return dedupe_notes(flagged.filter(F.col("reason").isNull())).unionByName(
        flagged.filter(F.col("reason").isNotNull()))


def parse_date(value) -> dt.date:
    if isinstance(value, dt.datetime):
        return value.date()
    if isinstance(value, dt.date):
        return value
    try:
        return dt.date.fromisoformat(str(value))
    except ValueError:
        raise ValueError(f"--date expects YYYY-MM-DD, got {value!r}") from None


def yesterday_utc() -> dt.date:
    return dt.datetime.now(dt.timezone.utc).date() - dt.timedelta(days=1)


def _read_notes(wh, spec: str):
    """The notes source, schema-checked, pinned to the Delta version read (so the job sees one snapshot)."""
    notes, read = wh.read_source(spec, t.NOTES_SCHEMA, "notes")
    if read.get("version") is not None:
        notes, read = wh.read_source(spec, t.NOTES_SCHEMA, "notes", version=read["version"])
    return notes, read


def run_score(wh, cfg: Config, date=None, since_last: bool = False, model_dir: str | Path | None = None,
              notes_source: str | None = None) -> dict:
    """Score one night (`date`, default yesterday UTC) or catch up (`since_last`).

    A night: every note dated `date` is filtered and the kept ones scored (a rerun rescores them: same
    rows). Catch-up: the dates holding a note neither scored by this model version nor rejected are
    processed as nights, each as `date` would process it (all its notes).
    Writes bertxml.predictions (replaceWhere the model version and those nights: their rows become the notes
    scored now), bertxml.model_labels (on model_version, label_index) and
    bertxml.rejects (replaceWhere job = 'score' and the nights processed), then refreshes
    the views. Returns the job's counts (notes_read, rejected, rejected_by_reason, notes_scored, chunks,
    notes_truncated, notes_per_s, ...). Raises on failure, for the exit status: a bad model folder
    (ModelDirError), a bad source schema (SchemaError), a night with no notes at all (NoNotesError,
    unless cfg.score.allow_empty).
    """
    if date is not None and since_last:
        raise ValueError("give --date or --since-last, not both")
    night = None if since_last else (parse_date(date) if date is not None else yesterday_utc())
    with job_run(wh, "score") as run:
        resolved = resolve_model(cfg, wh.workdir, model_dir)  # a folder, a models:/ URI, or the default
        info = read_model_info(resolved.model_dir, cfg.score.threshold_default)  # fails here, before Spark work
        run.inputs["model"] = {**resolved.to_dict(), "dir": str(info.model_dir), "model_version": info.model_version}
        run.count("model_version", info.model_version)
        notes, read = _read_notes(wh, notes_source or cfg.warehouse.notes)
        run.inputs["notes"] = read
        all_notes = notes
        done = _scored_ids(wh, run, info.model_version)
        if night is not None:
            nights = [night]
            notes = notes.filter(F.col("note_date") == F.lit(night))
        else:
            nights = _pending_nights(wh, notes, done)
            notes = notes.filter(F.col("note_date").isin([d for d in nights if d is not None])
                                 | (F.col("note_date").isNull() if None in nights else F.lit(False)))
        batches = [d.isoformat() if d is not None else "undated" for d in nights]
        run.count("batches", batches if len(batches) <= 31 else f"{len(batches)} nights")
        if not nights:
            log.info("score: every note is scored or rejected already (model %s)", info.model_version)
            for key in ("notes_read", "rejected", "notes_scored", "chunks", "notes_truncated"):
                run.count(key, 0)
            return {"run_id": run.run_id, **run.counts, "outputs": run.outputs}

        flagged = flag_notes(notes, cfg).persist(StorageLevel.MEMORY_AND_DISK)
        try:
            by_reason = {r["reason"]: r["n"]
                         for r in flagged.groupBy("reason").agg(F.count("*").alias("n")).collect()}
            run.count("notes_read", sum(by_reason.values()))
            if not by_reason and not since_last and not cfg.score.allow_empty:
                raise NoNotesError(f"no notes dated {night} in {read['source']}: the feed may not have landed "
                                   f"(set score.allow_empty=true to accept an empty night)")
            kept = flagged.filter(F.col("reason").isNull()).drop("reason").withColumn("text_bytes", F.octet_length("text"))
            _score_and_write(wh, cfg, run, info, kept, flagged, by_reason, batches, all_notes)
            run_night_drift(wh, cfg, run, info, kept, batches)  # bertxml.night_drift, against training
        finally:
            flagged.unpersist()
        create_views(wh)
        return {"run_id": run.run_id, **run.counts, "outputs": run.outputs}


def _scored_ids(wh, run, model_version: str):
    """note_id of every note this model version has scored (None when nothing is scored yet), read at a
    pinned Delta version so the job sees one snapshot however long it runs."""
    name = wh.name(t.PREDICTIONS)
    if not wh.exists(name):
        return None
    version = wh.version(name)
    run.inputs[name] = version
    return wh.table(name, version=version).filter(F.col("model_version") == model_version).select("note_id")


def _pending_nights(wh, notes, done) -> list:
    """Dates (None for undated) holding a note that is neither scored by this model nor rejected by an
    earlier scoring run: the nights a catch-up must process. Reads ids and dates only, not the text."""
    pending = notes.select("note_id", "note_date")
    if done is not None:
        pending = pending.join(done, "note_id", "left_anti")
    rejects = wh.name(t.REJECTS)
    if wh.exists(rejects):
        seen = wh.table(rejects).filter(F.col("job") == "score").select("note_id").distinct()
        pending = pending.join(seen, "note_id", "left_anti")
    return sorted((r[0] for r in pending.select("note_date").distinct().collect()),
                  key=lambda d: (d is None, d or dt.date.min))


def _score_and_write(wh, cfg: Config, run, info: ModelInfo, kept, flagged, by_reason: dict,
                     batches: list[str], all_notes) -> None:
    """Run the model over the kept notes (one Spark action, timed) and write the four tables.
    `all_notes`: the whole notes source (the pinned snapshot), for the encounters' other notes."""
    spark = wh.spark
    scored_at = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None, microsecond=0)
    note_cols = [f.name for f in t.NOTES_SCHEMA.fields if f.name != "text"] + ["text_bytes"]
    rejected = (flagged.filter(F.col("reason").isNotNull()).withColumn("text_bytes", F.octet_length("text"))
                .select(*note_cols, "reason"))
    seconds, stats, scored = 0.0, {}, None
    try:
        if by_reason.get(None):
            scored = score_notes(kept, info.model_dir, cfg.score).persist(StorageLevel.MEMORY_AND_DISK)
            started = time.perf_counter()
            with arrow_batch_conf(spark, cfg.score.arrow_batch_notes):  # the one action that runs the model
                stats = {r["reason"]: r for r in scored.groupBy("reason").agg(
                    F.count("*").alias("n"), F.sum("n_chunks").alias("chunks"),
                    F.sum(F.col("truncated").cast("int")).alias("truncated"),
                    F.sum(F.when(F.col("evidence").isNotNull(), F.size("evidence")).otherwise(0))
                    .alias("evidence")).collect()}
            seconds = time.perf_counter() - started
            rejected = rejected.unionByName(scored.filter(F.col("reason").isNotNull()).select(*note_cols, "reason"))
        ok = stats.get(None)
        n_scored = int(ok["n"]) if ok else 0
        n_run = sum(int(r["n"]) for r in stats.values())  # notes through the model, incl. 'no_tokens'
        name = wh.name(t.PREDICTIONS)
        dated = [b for b in batches if b != "undated"]  # undated notes are always rejected (null_note_date)
        if n_scored or (dated and wh.exists(name)):
            if n_scored:
                _write_model_labels(wh, run, info)
                preds = scored.filter(F.col("reason").isNull()).select(
                    "note_id", "patient_id", "note_date", F.lit(info.model_version).alias("model_version"),
                    F.lit(run.run_id).alias("run_id"), F.lit(scored_at).cast("timestamp").alias("scored_at"),
                    "probabilities", "top_codes", "predicted_codes", "n_chunks", "truncated", "encounter_id",
                    "predicted_bands")
                preds = preds.select(*[F.col(f.name).cast(f.dataType).alias(f.name)
                                       for f in t.PREDICTIONS_SCHEMA.fields])
            else:  # every note of the nights rejected: the write only deletes their old rows
                preds = spark.createDataFrame([], t.PREDICTIONS_SCHEMA)
            # The nights' rows of this model version are replaced by the notes scored now, in one transaction
            # (replaceWhere): a note scored before and now rejected, or gone from the source, loses its old
            # row; only the nights' partitions are read and rewritten.
            scope = (f"model_version = {sql_string(info.model_version)} AND note_date IN ("
                     + ", ".join(f"DATE'{d}'" for d in dated) + ")")
            before = wh.version(name)  # the nights' rows as they were: their encounters are touched too
            run.outputs[name] = wh.write(preds, name, replace_where=scope, partition_by=t.PREDICTIONS_PARTITIONS,
                                         merge_schema=True)
            if dated:
                write_encounter_predictions(wh, run, info, all_notes, dated, before, run.outputs[name], scored_at,
                                            cfg.score.top_k, night_notes=flagged)
        _write_evidence(wh, cfg, run, info, scored if n_scored else None, dated)

        # Rejects: batch = the note's date, so a rerun of a night (or a catch-up over it) replaces its own rows.
        n_rejected = sum(n for r, n in by_reason.items() if r) + sum(int(r["n"]) for k, r in stats.items() if k)
        reject_df = reject_rows(rejected, "notes", "score", "-", run.run_id).withColumn(
            "batch", F.coalesce(F.get_json_object("record", "$.note_date"), F.lit("undated")))
        rejects_name = wh.name(t.REJECTS)
        if batches and (n_rejected or wh.exists(rejects_name)):
            where = "job = 'score' AND batch IN (" + ", ".join(f"'{b}'" for b in batches) + ")"
            run.outputs[rejects_name] = wh.write(reject_df, rejects_name, replace_where=where,
                                                partition_by=t.REJECTS_PARTITIONS)

        reasons = {r: int(n) for r, n in by_reason.items() if r}
        for reason, row in stats.items():
            if reason:
                reasons[reason] = reasons.get(reason, 0) + int(row["n"])
        run.count("rejected", n_rejected)
        run.count("rejected_by_reason", dict(sorted(reasons.items())))
        run.count("notes_scored", n_scored)
        run.count("chunks", int(ok["chunks"] or 0) if ok else 0)
        run.count("notes_truncated", int(ok["truncated"] or 0) if ok else 0)
        run.count("evidence_spans", int(ok["evidence"] or 0) if ok else 0)
        run.count("scoring_seconds", round(seconds, 2))
        run.count("notes_per_s", round(n_run / seconds, 2) if seconds and n_run else None)
        if n_scored == 0:
            log.warning("score: no note scored in %s", ", ".join(batches[:5]))
    finally:
        if scored is not None:
            scored.unpersist()


def _write_evidence(wh, cfg: Config, run, info: ModelInfo, scored, dated: list[str]) -> None:
    """The nights' evidence rows of this model version become those of the notes scored now (`scored`, the
    UDF's persisted output; None when no note was scored), in one transaction: replaceWhere model_version and
    the nights, as predictions. With score.evidence off (or a model without label attention) an existing
    table loses the nights' rows of this model version, so it never disagrees with the predictions; a
    missing one is not created."""
    name = wh.name(t.EVIDENCE)
    on = cfg.score.evidence and cfg.score.evidence_top_k > 0 and info.model_kind == "bertxml"
    if not dated or (not (on and scored is not None) and not wh.exists(name)):
        return
    if on and scored is not None:
        spans = (scored.filter(F.col("reason").isNull())
                 .select("note_id", "note_date", F.explode("evidence").alias("e"))
                 .select("note_id", "note_date", F.lit(info.model_version).alias("model_version"), "e.*",
                         F.lit(run.run_id).alias("run_id")))
        spans = spans.select(*[F.col(f.name).cast(f.dataType).alias(f.name) for f in t.EVIDENCE_SCHEMA.fields])
    else:
        spans = wh.spark.createDataFrame([], t.EVIDENCE_SCHEMA)
    scope = (f"model_version = {sql_string(info.model_version)} AND note_date IN ("
             + ", ".join(f"DATE'{d}'" for d in dated) + ")")
    run.outputs[name] = wh.write(spans, name, replace_where=scope, partition_by=t.EVIDENCE_PARTITIONS)


def _write_model_labels(wh, run, info: ModelInfo) -> None:
    """The model's label vocabulary and operating points into bertxml.model_labels (MERGE on model_version,
    label_index), once per model version: the views join predictions to codes through it. A table an
    earlier bertxml created gains the operating-point columns (schema evolution) on the next write."""
    name = wh.name(t.MODEL_LABELS)
    if wh.exists(name):
        table = wh.table(name)
        if (set(t.MODEL_LABELS_SCHEMA.fieldNames()) <= set(table.columns)
                and table.filter(F.col("model_version") == info.model_version).count() == info.n_labels):
            return
    labels = wh.spark.createDataFrame(info.label_rows(), t.MODEL_LABELS_SCHEMA)
    run.outputs[name] = wh.merge(labels, name, ["model_version", "label_index"], evolve_schema=True)
