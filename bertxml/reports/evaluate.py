"""Evaluation (paper §4.4): micro and macro AUC, the low-frequency macro AUC of Table 3, F1 and P@k, and the
per-code AUC histogram of Figure 2, for a model on a split or on nightly batches since coded.

    bertxml evaluate [--split dev|test | --date D | --from D --to D] [--model DIR | --compare champion,challenger]
                     [--level note|encounter|both]

- `--split dev|test`: the notes of `bertxml.labeled_notes` in that split, with their ETL labels.
- `--date D`, `--from D --to D`: the notes of those nights from the notes SOURCE, labelled exactly as the
  ETL labels them (`bertxml.etl.etl.label_notes`: encounter codes plus chronic codes imputed from every
  diagnosis known now), so a model's drift shows night by night. Notes whose encounter has no diagnosis
  yet are left out (counted). A range writes one report row for the whole range and one per night.

`--level encounter` (or `both`, beside the note level) scores encounters as coders code them: an
encounter's probability per code is the maximum over its notes in the set (as `bertxml.encounter_predictions`
holds it), its labels the union of its notes' labels, i.e. the encounter's codes plus the chronic codes the
ETL imputes. Its datasets are named 'encounter:' + the note level's ('encounter:test',
'encounter:date:2025-12-29'; a range's nights by each encounter's last note), and n_notes counts encounters.

A note's probabilities come from `bertxml.predictions` when this model version has scored it, else
from the model on the fly through the same pandas-UDF path as `bertxml score` (`score.score_notes`).
Labels are matched to the model's outputs by code string (its label_vocab.json); codes outside the
model's vocabulary cannot be predicted and are ignored.

Everything is computed in Spark, so it scales with the data: the (note, code, probability, label) rows
are grouped into counts per (code, probability) and the AUC is the Mann-Whitney statistic from the rank
sum with average ranks for ties,
    AUC = (R_pos - P (P + 1) / 2) / (P N),   R_pos = sum over positives of their average rank,
per code (a window per code) and over all pairs (micro: ranks over value buckets whose offsets come from
a small prefix sum, so no single partition holds every probability). Only per-code summaries reach the
driver. Codes with no positive or no negative note are skipped and counted.

Writes `bertxml.auc_report` (one row per dataset) and `bertxml.code_auc` (per-code AUCs of the main
dataset), each in one transaction that replaces the rows an earlier run of the same model version left
for those datasets (replaceWhere): a rerun leaves them as one clean run would.
Also WORKDIR/reports/<run_id>/: code_auc_hist.png (Figure 2) and report.json (metrics, model, inputs and the
resolved config); earlier runs' folders stay. The view bertxml.latest_auc shows the report per model
version and dataset.

`--compare champion,challenger` evaluates each alias of the registered model on the same notes (one run,
one set of rows per model_version) and prints them side by side (`run_evaluate_aliases`).

The same report from in-memory arrays is `bertxml.metrics.auc_report_from_arrays` (`bertxml compare`); the
per-code summary both share is `bertxml.metrics.summarize_codes`.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from pyspark import StorageLevel
from pyspark.sql import functions as F
from pyspark.sql.window import Window

from bertxml.config import Config
from bertxml.etl.etl import label_notes
from bertxml.etl.icd import icd_reference
from bertxml.metrics import METRICS, P_AT, summarize_codes
from bertxml.models.registry import MODELS_SCHEME, resolve_model
from bertxml.platform import tables as t
from bertxml.platform.runs import job_run
from bertxml.platform.views import create_views
from bertxml.platform.warehouse import sql_string
from bertxml.scoring.encounters import encounter_probabilities
from bertxml.scoring.predictors import read_model_info
from bertxml.scoring.score import parse_date
from bertxml.scoring.udf import arrow_batch_conf, score_notes

log = logging.getLogger("bertxml.reports.evaluate")

N_BUCKETS = 4096          # value buckets for the micro AUC's ranks: logit in [-32, 32] at 1/64 resolution
LEVELS = ("note", "encounter", "both")
ENCOUNTER_PREFIX = "encounter:"


# ---- Spark: AUCs by rank sums ----------------------------------------------------------------------------
def score_counts(df, keys: list[str], score_col: str = "probability", label_col: str = "label"):
    """(keys..., score, n_pos, n_neg): how many positive and negative rows share each score value."""
    label = F.col(label_col).cast("long")
    return df.groupBy(*keys, F.col(score_col).alias("score")).agg(
        F.sum(label).alias("n_pos"), F.sum(1 - label).alias("n_neg"))


def _rank_sum_auc(counts, keys: list[str], below):
    """Aggregate counts (keys..., score, n_pos, n_neg) with `below` (rows ranked under each score value) into
    (keys..., n_pos, n_neg, auc): average rank = below + (n + 1) / 2; AUC = (R_pos - P(P+1)/2) / (P N)."""
    n = (F.col("n_pos") + F.col("n_neg")).cast("double")
    ranked = counts.withColumn("_r", F.col("n_pos").cast("double") * (below + (n + 1) / 2))
    agg = ranked.groupBy(*keys).agg(F.sum("n_pos").alias("n_pos"), F.sum("n_neg").alias("n_neg"),
                                    F.sum("_r").alias("_rank_sum"))
    p, q = F.col("n_pos").cast("double"), F.col("n_neg").cast("double")
    auc = F.when((p > 0) & (q > 0), (F.col("_rank_sum") - p * (p + 1) / 2) / (p * q))
    return agg.select(*keys, "n_pos", "n_neg", auc.alias("auc"))


def auc_from_counts(counts, keys: list[str]):
    """Per-key AUC (e.g. per code) from score_counts output: one window per key ordered by score."""
    w = Window.partitionBy(*keys).orderBy("score").rowsBetween(Window.unboundedPreceding, -1)
    below = F.coalesce(F.sum(F.col("n_pos") + F.col("n_neg")).over(w), F.lit(0)).cast("double")
    return _rank_sum_auc(counts, keys, below)


def _bucket(score):
    """A monotone map of a score to 0..N_BUCKETS-1 (logit grid): equal scores share a bucket and a higher
    score never lands in a lower one, so ranks can be counted bucket by bucket."""
    p = score.cast("double")
    logit = F.log(p) - F.log1p(-p)
    cell = F.floor((logit + 32.0) * (N_BUCKETS / 64.0))
    return (F.when(p <= 0, 0).when(p >= 1, N_BUCKETS - 1)
            .otherwise(F.least(F.greatest(cell, F.lit(0)), F.lit(N_BUCKETS - 1))).cast("int"))


def micro_auc_from_counts(counts, by: list[str]):
    """(by..., n_pos, n_neg, auc) over ALL (row, code) pairs of each `by` group from score_counts output.

    A global rank would put every value in one partition; instead values are bucketed (`_bucket`), each
    bucket's offset is the prefix sum of the bucket sizes before it (a few thousand rows), and ranks are
    counted within buckets in parallel.
    """
    g = counts.groupBy(*by, "score").agg(F.sum("n_pos").alias("n_pos"), F.sum("n_neg").alias("n_neg"))
    g = g.withColumn("_bucket", _bucket(F.col("score")))
    sizes = g.groupBy(*by, "_bucket").agg(F.sum(F.col("n_pos") + F.col("n_neg")).alias("_n"))
    before = Window.partitionBy(*by).orderBy("_bucket").rowsBetween(Window.unboundedPreceding, -1)
    offsets = sizes.select(*by, "_bucket", F.coalesce(F.sum("_n").over(before), F.lit(0)).alias("_offset"))
    g = g.join(offsets, [*by, "_bucket"])
    within = Window.partitionBy(*by, "_bucket").orderBy("score").rowsBetween(Window.unboundedPreceding, -1)
    inside = F.coalesce(F.sum(F.col("n_pos") + F.col("n_neg")).over(within), F.lit(0))
    below = (F.col("_offset") + inside).cast("double")
    return _rank_sum_auc(g, by, below)


def auc_by_code(df, code_col: str = "code", score_col: str = "probability", label_col: str = "label",
                by: tuple[str, ...] = ()):
    """Per-code AUC in Spark: df rows (by..., code, score, label 0/1) -> (by..., code, n_pos, n_neg, auc),
    auc null for a code with no positive or no negative row. Ties get average ranks (= sklearn)."""
    keys = [*by, code_col]
    return auc_from_counts(score_counts(df, keys, score_col, label_col), keys)


def micro_auc(df, score_col: str = "probability", label_col: str = "label", by: tuple[str, ...] = ()):
    """Micro AUC in Spark over all rows of df (per `by` group): (by..., n_pos, n_neg, auc)."""
    if not by:
        df, by = df.withColumn("_all", F.lit(0)), ("_all",)
    out = micro_auc_from_counts(score_counts(df, list(by), score_col, label_col), list(by))
    return out.drop("_all") if by == ("_all",) else out


def precision_at_k(k: int, n_labels: int):
    """Column: the share of a note's k most probable codes that are its true codes (`label_idx`)."""
    k = min(k, n_labels)
    ranked = F.sort_array(F.transform("probabilities", lambda p, i: F.struct(p.alias("p"), i.alias("i"))), asc=False)
    top = F.transform(F.slice(ranked, 1, k), lambda s: s["i"])
    return F.size(F.array_intersect(top, F.col("label_idx"))) / F.lit(float(k))


# ---- the evaluation sets ---------------------------------------------------------------------------------
def _labels(labeled, code_map, key: str = "note_id"):
    """(key, label_idx ARRAY<INT>): the label indices of the codes of a note (or, key 'encounter_id', of
    all an encounter's notes) that are in the model's vocabulary."""
    pairs = labeled.select(key, F.explode_outer("codes").alias("code"))
    pairs = pairs.join(F.broadcast(code_map.select("code", "code_index")), "code", "left")
    return pairs.groupBy(key).agg(F.array_sort(F.collect_set("code_index")).alias("label_idx"))


def encounter_set(probs, labeled, code_map, datasets):
    """Encounter-level evaluation rows (dataset, note_id = the encounter_id, probabilities, label_idx): the
    max over the encounter's notes (`bertxml.scoring.encounters.encounter_probabilities`) against the union of
    their labels. `datasets(date column)` -> the dataset names of an encounter dated by its last note."""
    notes = probs.join(labeled.select("note_id", "encounter_id", "note_date"), "note_id")
    last = notes.groupBy("encounter_id").agg(F.max("note_date").alias("note_date"))
    highest = encounter_probabilities(notes.select("encounter_id", "probabilities"))
    rows = highest.join(last, "encounter_id").join(_labels(labeled, code_map, "encounter_id"), "encounter_id")
    return rows.select(F.explode(datasets(F.col("note_date"))).alias("dataset"),
                       F.col("encounter_id").alias("note_id"), "probabilities", "label_idx")


def note_probabilities(wh, labeled, info, cfg: Config, run):
    """(note_id, probabilities) for the labeled notes: from bertxml.predictions where this model version
    scored the note, the rest scored now through the scoring UDF (not written anywhere)."""
    ids = labeled.select("note_id")
    preds_name = wh.name(t.PREDICTIONS)
    have = None
    if wh.exists(preds_name):
        version = wh.version(preds_name)
        run.inputs[preds_name] = version
        have = (wh.table(preds_name, version=version).filter(F.col("model_version") == info.model_version)
                .select("note_id", "probabilities").join(ids, "note_id", "left_semi"))
        labeled = labeled.join(have.select("note_id"), "note_id", "left_anti")
    fresh = score_notes(labeled.select("note_id", "text"), info.model_dir, cfg.score)
    fresh = fresh.filter(F.col("reason").isNull()).select("note_id", "probabilities")
    return fresh if have is None else have.unionByName(fresh)


def _dataset_names(split, date_from, date_to) -> tuple[str, bool]:
    if split:
        return split, False
    if date_from == date_to:
        return f"date:{date_from.isoformat()}", False
    return f"dates:{date_from.isoformat()}..{date_to.isoformat()}", True


def labeled_for_dates(wh, cfg: Config, date_from: dt.date, date_to: dt.date, run, notes_source=None,
                      diagnoses_source=None):
    """The notes of [date_from, date_to] labelled as the ETL labels them, from every diagnosis known now."""
    notes, read_n = wh.read_source(notes_source or cfg.warehouse.notes, t.NOTES_SCHEMA, "notes")
    diagnoses, read_d = wh.read_source(diagnoses_source or cfg.warehouse.diagnoses, t.DIAGNOSES_SCHEMA, "diagnoses")
    run.inputs.update({"notes": read_n, "diagnoses": read_d})
    notes = notes.filter(F.col("note_date").between(F.lit(date_from), F.lit(date_to)))
    reference = icd_reference(wh.spark, cfg.etl.chronic_source)
    frames = label_notes(notes, diagnoses, reference, cfg.etl, run.run_id)
    left_out = {r["reason"]: r["n"] for r in frames.rejects.filter(F.col("source") == "notes")
                .groupBy("reason").agg(F.count("*").alias("n")).collect()}
    run.count("notes_left_out_by_reason", dict(sorted(left_out.items())))
    return frames.labeled.select("note_id", "encounter_id", "note_date", "text", "codes")


# ---- the job -----------------------------------------------------------------------------------------------
def run_evaluate(wh, cfg: Config, split: str | None = None, date=None, date_from=None, date_to=None,
                 model_dir: str | Path | None = None, notes_source: str | None = None,
                 diagnoses_source: str | None = None, level: str = "note") -> dict:
    """Evaluate a model (default: the newest under WORKDIR/models) on a split (default
    cfg.evaluate.default_split) or on nights (`date`, or `date_from`..`date_to`), at the note level,
    the encounter level (datasets 'encounter:...') or both (`level`).

    Writes bertxml.auc_report rows (one per dataset) and bertxml.code_auc rows, replacing this model
    version's rows of those datasets, draws the Figure 2
    histogram. Returns {"run_id", "model_version", "dataset", "metrics": {dataset: {...}}, "report_dir",
    ...counts}.
    """
    if date is not None:
        if date_from is not None or date_to is not None:
            raise ValueError("give --date or --from/--to, not both")
        date_from = date_to = date
    if (date_from is None) != (date_to is None):
        raise ValueError("--from and --to go together")
    if split and date_from is not None:
        raise ValueError("give --split or dates, not both")
    if date_from is None:
        split = split or cfg.evaluate.default_split
        if split not in ("train", "dev", "test"):
            raise ValueError(f"--split must be dev or test (or train), got {split!r}")
    else:
        date_from, date_to = parse_date(date_from), parse_date(date_to)
        if date_to < date_from:
            raise ValueError(f"--from {date_from} is after --to {date_to}")
    if level not in LEVELS:
        raise ValueError(f"--level must be one of {', '.join(LEVELS)}, got {level!r}")
    main, per_night = _dataset_names(split, date_from, date_to)
    mains = ([main] if level != "encounter" else []) + ([ENCOUNTER_PREFIX + main] if level != "note" else [])
    spark = wh.spark

    with job_run(wh, "evaluate") as run:
        resolved = resolve_model(cfg, wh.workdir, model_dir)  # a folder, a models:/ URI, or the default
        info = read_model_info(resolved.model_dir, cfg.score.threshold_default)
        run.inputs["model"] = {**resolved.to_dict(), "dir": str(info.model_dir), "model_version": info.model_version}
        run.count("model_version", info.model_version)
        run.count("dataset", mains[0])
        code_map = spark.createDataFrame(
            [(i, c, r.get("description"), int(r.get("train_count") or 0), float(info.thresholds[i]))
             for i, (c, r) in enumerate(zip(info.codes, info.labels))],
            "code_index INT, code STRING, description STRING, train_count BIGINT, threshold FLOAT")

        if split:
            name = wh.name(t.LABELED_NOTES)
            version = wh.version(name)
            if version is None:
                raise FileNotFoundError(f"table {name} does not exist: run `bertxml etl` first")
            run.inputs[name] = version
            labeled = wh.table(name, version=version).filter(F.col("split") == split) \
                .select("note_id", "encounter_id", "note_date", "text", "codes")
        else:
            labeled = labeled_for_dates(wh, cfg, date_from, date_to, run, notes_source, diagnoses_source)

        labeled = labeled.persist(StorageLevel.MEMORY_AND_DISK)  # read by the scoring, the dates and the labels
        with arrow_batch_conf(spark, cfg.score.arrow_batch_notes):
            probs = note_probabilities(wh, labeled, info, cfg, run).persist(StorageLevel.MEMORY_AND_DISK)

            def datasets(date, prefix=""):
                return (F.array(F.lit(prefix + main), F.concat(F.lit(prefix + "date:"), date.cast("string")))
                        if per_night else F.array(F.lit(prefix + main)))

            parts = []
            if level != "encounter":
                notes = (probs.join(labeled.select("note_id", "note_date"), "note_id")
                         .join(_labels(labeled, code_map), "note_id"))
                parts.append(notes.select(F.explode(datasets(F.col("note_date"))).alias("dataset"), "note_id",
                                          "probabilities", "label_idx"))
            if level != "note":
                parts.append(encounter_set(probs, labeled, code_map, lambda d: datasets(d, ENCOUNTER_PREFIX)))
            notes = parts[0] if len(parts) == 1 else parts[0].unionByName(parts[1])
            notes = notes.persist(StorageLevel.MEMORY_AND_DISK)
            try:
                metrics = _metrics(notes, code_map, info, cfg)
            finally:
                notes.unpersist()
                probs.unpersist()
                labeled.unpersist()
        if not metrics:
            raise ValueError(f"no labelled note to evaluate in {main}")
        if level != "note":
            run.count("n_encounters", metrics[ENCOUNTER_PREFIX + main]["n_notes"])
        main = mains[0]  # what the histogram, report.json and the counts below describe
        run.count("n_notes", metrics[main]["n_notes"])

        created = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
        report_rows = [(run.run_id, info.model_version, name, *[m[k] for k in METRICS], created)
                       for name, m in sorted(metrics.items(), key=lambda kv: (kv[0] not in mains, kv[0]))]
        report_df = spark.createDataFrame([_typed(r) for r in report_rows], t.AUC_REPORT_SCHEMA)
        model_version = sql_string(info.model_version)
        datasets = ", ".join(sql_string(r[2]) for r in report_rows)
        run.outputs[wh.name(t.AUC_REPORT)] = wh.write(
            report_df, wh.name(t.AUC_REPORT),
            replace_where=f"model_version = {model_version} AND dataset IN ({datasets})")
        code_rows = []
        for name in (m for m in mains if m in metrics):  # per-code AUCs of each level's main dataset
            per_code = metrics[name]["per_code"]
            code_rows += [(run.run_id, info.model_version, name, c, r.get("description"),
                           None if np.isnan(per_code["auc"][i]) else float(per_code["auc"][i]),
                           int(per_code["n_pos"][i]), int(r.get("train_count") or 0))
                          for i, (c, r) in enumerate(zip(info.codes, info.labels))]
        written = ", ".join(sql_string(m) for m in mains if m in metrics)
        run.outputs[wh.name(t.CODE_AUC)] = wh.write(
            spark.createDataFrame(code_rows, t.CODE_AUC_SCHEMA), wh.name(t.CODE_AUC),
            replace_where=f"model_version = {model_version} AND dataset IN ({written})")
        per_code = metrics[main]["per_code"]
        create_views(wh)

        report_dir = wh.workdir / "reports" / run.run_id
        report_dir.mkdir(parents=True, exist_ok=True)
        plot_code_auc_histogram(per_code["auc"], report_dir / "code_auc_hist.png",
                                f"{info.model_version} on {main}")
        summary = {name: {k: m[k] for k in METRICS} for name, m in metrics.items()}
        (report_dir / "report.json").write_text(json.dumps(
            {"run_id": run.run_id, "model_version": info.model_version, "model_dir": str(info.model_dir),
             "dataset": main, "metrics": summary, "inputs": run.inputs, "config": cfg.to_dict()},
            indent=2, default=str))
        for key in ("micro_auc", "macro_auc", "macro_auc_low_freq", "n_codes_scored", "n_codes_skipped"):
            run.count(key, summary[main][key])
        run.outputs["report_dir"] = str(report_dir)
        return {"run_id": run.run_id, "model_version": info.model_version, "dataset": main, "metrics": summary,
                "report_dir": str(report_dir), **run.counts}


def run_evaluate_aliases(wh, cfg: Config, aliases, split: str | None = None, date=None, date_from=None,
                         date_to=None, notes_source: str | None = None, diagnoses_source: str | None = None) -> dict:
    """`bertxml evaluate --compare champion,challenger`: `run_evaluate` for each alias of the registered
    model (`models:/<mlflow.model_name>@ALIAS`) on the same split or nights. Each run writes its rows to
    bertxml.auc_report and code_auc under its own model_version (its job_runs row names the alias), so the
    two sit side by side. Returns {"aliases": {alias: {model_version, registered_version, run_id,
    metrics}}, "markdown": the two side by side}. Two aliases on one version are refused (nothing to compare).
    """

    names = [a.strip() for a in (aliases.split(",") if isinstance(aliases, str) else aliases) if a.strip()]
    if len(names) < 2 or len(set(names)) != len(names):
        raise ValueError(f"--compare needs two or more different aliases, e.g. champion,challenger; got {names}")
    uris = {a: f"{MODELS_SCHEME}{cfg.mlflow.model_name}@{a}" for a in names}
    resolved = {a: resolve_model(cfg, wh.workdir, uri) for a, uri in uris.items()}  # all exist, before any work
    versions = {}
    for alias, r in resolved.items():
        if r.version in versions:
            raise ValueError(f"aliases {versions[r.version]} and {alias} both point at version {r.version}: "
                             f"nothing to compare")
        versions[r.version] = alias
    out = {}
    for alias in names:
        result = run_evaluate(wh, cfg, split=split, date=date, date_from=date_from, date_to=date_to,
                              model_dir=uris[alias], notes_source=notes_source, diagnoses_source=diagnoses_source)
        out[alias] = {"model_version": result["model_version"], "registered_version": resolved[alias].version,
                      "run_id": result["run_id"], "dataset": result["dataset"], "metrics": result["metrics"]}
    return {"aliases": out, "markdown": aliases_markdown(out)}


def aliases_markdown(results: dict) -> str:
    """A markdown table: one row per dataset, micro and macro AUC of each alias side by side."""
    aliases = list(results)
    datasets = sorted({d for r in results.values() for d in r["metrics"]},
                      key=lambda d: (d != next(iter(results.values()))["dataset"], d))

    def fmt(v):
        return "n/a" if v is None else f"{v:.3f}"

    head = ["dataset"] + [f"{a} {m}" for a in aliases for m in ("micro AUC", "macro AUC")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for d in datasets:
        cells = [d]
        for a in aliases:
            m = results[a]["metrics"].get(d, {})
            cells += [fmt(m.get("micro_auc")), fmt(m.get("macro_auc"))]
        lines.append("| " + " | ".join(cells) + " |")
    versions = ", ".join(f"{a} = version {r['registered_version']} ({r['model_version']})" for a, r in results.items())
    return "\n".join(lines) + f"\n\n{versions}\n"


def _typed(row: tuple) -> tuple:
    """Python scalars for createDataFrame: numpy numbers and NaN become float/int/None."""
    out = []
    for v in row:
        if isinstance(v, (np.floating, float)):
            out.append(None if np.isnan(v) else float(v))
        elif isinstance(v, np.integer):
            out.append(int(v))
        else:
            out.append(v)
    return tuple(out)


def _metrics(notes, code_map, info, cfg: Config) -> dict:
    """{dataset: metrics + "per_code"} from notes (dataset, note_id, probabilities, label_idx), in Spark."""
    m = info.n_labels
    exploded = notes.select("dataset", F.posexplode("probabilities").alias("code_index", "probability"),
                            "label_idx").select(
        "dataset", "code_index", "probability",
        F.array_contains("label_idx", F.col("code_index")).cast("int").alias("label"))
    counts = score_counts(exploded, ["dataset", "code_index"]).persist(StorageLevel.MEMORY_AND_DISK)
    try:
        per_code = auc_from_counts(counts, ["dataset", "code_index"])
        hits = (counts.join(F.broadcast(code_map.select("code_index", "threshold")), "code_index")
                .withColumn("_hit", F.col("score") >= F.col("threshold"))
                .groupBy("dataset", "code_index")
                .agg(F.sum(F.when(F.col("_hit"), F.col("n_pos")).otherwise(0)).alias("tp"),
                     F.sum(F.when(F.col("_hit"), F.col("n_neg")).otherwise(0)).alias("fp")))
        rows = per_code.join(hits, ["dataset", "code_index"]).collect()       # M rows per dataset
        micro = {r["dataset"]: r["auc"] for r in micro_auc_from_counts(counts, ["dataset"]).collect()}
    finally:
        counts.unpersist()
    at_k = notes.groupBy("dataset").agg(F.count("*").alias("n_notes"), *[
        F.avg(precision_at_k(k, m)).alias(f"p_at_{k}") for k in P_AT]).collect()
    train_counts = np.array([int(r.get("train_count") or 0) for r in info.labels])
    out = {}
    for row in at_k:
        name = row["dataset"]
        arrays = {k: np.zeros(m) for k in ("n_pos", "n_neg", "tp", "fp")}
        arrays["auc"] = np.full(m, np.nan)
        for r in (r for r in rows if r["dataset"] == name):
            j = r["code_index"]
            for k in ("n_pos", "n_neg", "tp", "fp"):
                arrays[k][j] = r[k]
            arrays["auc"][j] = np.nan if r["auc"] is None else r["auc"]
        summary = summarize_codes(arrays["n_pos"], arrays["n_neg"], arrays["auc"], arrays["tp"], arrays["fp"],
                                  train_counts, cfg.evaluate.low_freq_threshold)
        out[name] = {**summary, "micro_auc": micro.get(name), "n_notes": int(row["n_notes"]),
                     **{f"p_at_{k}": row[f"p_at_{k}"] for k in P_AT}, "per_code": arrays}
    return out


def plot_code_auc_histogram(aucs, path: str | Path, title: str) -> Path:
    """Paper Figure 2: the distribution of per-code AUCs (skipped codes left out), as a PNG."""
    values = np.asarray(aucs, dtype=np.float64)
    values = values[~np.isnan(values)]
    fig = Figure(figsize=(7, 4), dpi=110)   # no pyplot: no global backend, nothing left open
    ax = fig.subplots()
    ax.hist(values, bins=np.linspace(0, 1, 51), color="#4c72b0", edgecolor="white")
    ax.set_xlabel("AUC")
    ax.set_ylabel("ICD-10 codes")
    high = int((values >= 0.98).sum())
    ax.set_title(f"{title}\n{len(values)} codes, {high} with AUC >= 0.98", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)
