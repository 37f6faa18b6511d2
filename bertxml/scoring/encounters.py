"""Encounter-level predictions: coders code encounters, not notes. A code's probability for an encounter is
its maximum over the encounter's scored notes (the paper's max over a note's chunks, §4.1, one level up).

Written by `bertxml score` into `bertxml.encounter_predictions`, after the night's predictions
(`write_encounter_predictions`), in one MERGE on (encounter_id, model_version):
- the encounters TOUCHED by a run are those with a note (kept or rejected) dated one of the nights scored in
  the notes source, plus those of the nights' prediction rows before the run replaced them (a note deleted
  from the source still touches its encounter);
- each touched encounter is recomputed from ALL its notes: its notes in the source (the run's pinned
  snapshot) that this model version has a prediction for, whatever night they were scored; an encounter
  left with none loses its row. So an encounter whose notes arrive over several nights, a rerun, or a
  catch-up ends as one clean computation over the same predictions would leave it.
Bands and predicted codes follow the note-level rule (`bertxml.models.modeldir.predicted_bands`) on the maximum.

`encounter_probabilities(notes)` is the same maximum for any (encounter_id, probabilities) frame
(`bertxml evaluate --level encounter`).
"""
from __future__ import annotations

import datetime as dt
import logging

import numpy as np
import pandas as pd
from pyspark import StorageLevel
from pyspark.sql import functions as F

from bertxml.models.modeldir import predicted_bands, top_codes
from bertxml.platform import tables as t

log = logging.getLogger("bertxml.scoring.encounters")


def _highest(column: str):
    """Each code's maximum over an array of probability arrays (all of a model's arrays share one length)."""
    return F.aggregate(F.slice(column, 2, 1 << 30), F.element_at(column, 1),
                       lambda acc, x: F.zip_with(acc, x, lambda a, b: F.greatest(a, b)))


def encounter_probabilities(notes, keys=("encounter_id",)):
    """(keys..., probabilities, ...) rows of notes -> (keys..., probabilities): per key, each code's maximum
    over the rows, elementwise in Spark (no explode; all rows of a model share one length)."""
    stacked = notes.groupBy(*keys).agg(F.collect_list("probabilities").alias("_p"))
    return stacked.select(*keys, _highest("_p").alias("probabilities"))


def encounter_frames(frames, info, top_k: int, model_version: str, updated_at: dt.datetime):
    """mapInPandas body: (encounter_id, patient_id, first_note_date, last_note_date, n_notes, probabilities)
    with probabilities already the max -> ENCOUNTER_PREDICTIONS_SCHEMA rows (top codes, predicted codes and
    bands as the note level computes them). n_notes 0 (an encounter left with no scored note) passes with
    null probabilities: the MERGE deletes its row."""
    codes = np.array(info.codes, dtype=object)
    columns = t.ENCOUNTER_PREDICTIONS_SCHEMA.fieldNames()
    for frame in frames:
        if len(frame) == 0:
            continue
        has = frame["n_notes"].fillna(0).astype(int).to_numpy() > 0
        probs = np.zeros((len(frame), info.n_labels), dtype=np.float32)
        if has.any():
            probs[has] = np.stack([np.asarray(p, dtype=np.float32) for p in frame["probabilities"][has]])
        tops = top_codes(probs, codes, top_k)
        hits, bands = predicted_bands(probs, info)
        out = frame[["encounter_id", "patient_id", "first_note_date", "last_note_date"]].copy()
        out["model_version"] = model_version
        out["n_notes"] = frame["n_notes"].fillna(0).astype("int32")
        out["probabilities"] = [p if h else None for h, p in zip(has, probs)]
        out["top_codes"] = [x if h else None for h, x in zip(has, tops)]
        out["predicted_codes"] = [x if h else None for h, x in zip(has, hits)]
        out["predicted_bands"] = [x if h else None for h, x in zip(has, bands)]
        out["updated_at"] = pd.Timestamp(updated_at)
        yield out[columns]


def touched_encounters(wh, night_notes, nights: list, model_version: str, before_version: int | None):
    """encounter_id of every encounter a run over `nights` touches: a note of the nights in `night_notes`
    (the notes source, or the job's notes of those nights already in hand: kept and rejected alike), or a
    prediction row of the nights (this model version) as the table stood before the run."""
    in_nights = F.col("note_date").isin(nights)
    touched = night_notes.filter(in_nights).select("encounter_id")
    name = wh.name(t.PREDICTIONS)
    if before_version is not None:
        old = wh.table(name, version=before_version)
        if "encounter_id" in old.columns:  # a table an earlier bertxml wrote has none
            touched = touched.unionByName(old.filter(in_nights & (F.col("model_version") == model_version))
                                          .select("encounter_id"))
    return touched.filter(F.col("encounter_id").isNotNull()).distinct()


def write_encounter_predictions(wh, run, info, all_notes, nights: list[str], before_version: int | None,
                                after_version: int, updated_at: dt.datetime, top_k: int,
                                night_notes=None) -> None:
    """Recompute the encounters the run touched from bertxml.predictions at `after_version` and MERGE them
    into bertxml.encounter_predictions (one transaction). `nights`: the ISO dates scored; `before_version`:
    the predictions table's version before the run wrote it (None when it did not exist); `night_notes`:
    every note of those nights in `all_notes` (kept or rejected; default: read from `all_notes`), which
    the nightly job holds in memory.

    Spark work: one job finds the touched encounters and their notes (kept in memory: both are used
    again) and the nights those notes are dated; the MERGE's source then reads only those nights'
    prediction rows and takes each encounter's summary and maximum in one aggregation."""
    days = [dt.date.fromisoformat(d) for d in nights]
    # One partition: the ids are few, and a cached frame's own hash partitioning would hold the final join
    # (and its pandas step) at spark.sql.shuffle.partitions tasks, where a shuffle lets AQE coalesce them.
    touched = (touched_encounters(wh, all_notes if night_notes is None else night_notes, days, info.model_version,
                                  before_version).coalesce(1).persist(StorageLevel.MEMORY_AND_DISK))
    members = (all_notes.select("note_id", "encounter_id", "patient_id", "note_date")
               .join(touched, "encounter_id", "left_semi")).persist(StorageLevel.MEMORY_AND_DISK)
    try:
        # Only the nights holding a touched encounter's note are read (partition pruning on note_date).
        dates = sorted(r[0] for r in members.select("note_date").distinct().collect() if r[0] is not None)
        preds = (wh.table(wh.name(t.PREDICTIONS), version=after_version)
                 .filter((F.col("model_version") == info.model_version) & F.col("note_date").isin(dates))
                 .select("note_id", "note_date", "probabilities"))
        per_encounter = (members.join(preds, ["note_id", "note_date"]).groupBy("encounter_id").agg(
            F.max("patient_id").alias("patient_id"), F.min("note_date").alias("first_note_date"),
            F.max("note_date").alias("last_note_date"), F.count("*").cast("int").alias("n_notes"),
            F.collect_list("probabilities").alias("_p")))
        rows = (touched.join(per_encounter, "encounter_id", "left")
                .select("encounter_id", "patient_id", "first_note_date", "last_note_date", "n_notes",
                        _highest("_p").alias("probabilities")))
        version, when = info.model_version, updated_at

        def body(frames):
            yield from encounter_frames(frames, info, top_k, version, when)

        encounters = rows.mapInPandas(body, schema=t.ENCOUNTER_PREDICTIONS_SCHEMA)
        name = wh.name(t.ENCOUNTER_PREDICTIONS)
        run.outputs[name] = wh.merge(encounters, name, ["encounter_id", "model_version"],
                                     delete_when="s.n_notes = 0")
    finally:
        members.unpersist()
        touched.unpersist()
    metrics = (wh._commit_info(name, run.outputs[name]).get("operationMetrics") or {})
    for key, metric in (("encounters_inserted", "numTargetRowsInserted"),
                        ("encounters_updated", "numTargetRowsUpdated"),
                        ("encounters_deleted", "numTargetRowsDeleted")):
        if metric in metrics:
            run.count(key, int(metrics[metric]))
    if "numOutputRows" in metrics and "numTargetRowsInserted" not in metrics:  # the table's first write
        run.count("encounters_inserted", int(metrics["numOutputRows"]))
