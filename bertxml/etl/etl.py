"""The ETL of the paper's §4.1: filter notes, attach encounter codes, impute chronic codes, split by patient.

    bertxml etl [--notes SOURCE] [--diagnoses SOURCE] [--min-code-count N] [--as-of-run RUN_ID | --as-of-timestamp T]

Reads the notes and diagnoses tables and writes, each in one Delta transaction:
- `bertxml.labeled_notes`: the kept notes with their split, codes and imputed chronic codes;
- `bertxml.label_vocab`: the codes seen more than `min_code_count` times in the train split;
- `bertxml.rejects`: every dropped or bad row's identifiers with a reason (never its text).

Rules, each a function below: `note_reject_reason` (paper's filters and bad rows), `mark_duplicates`,
`clean_diagnoses`, `encounter_codes`, `impute_chronic_codes`, `assign_split`, `build_label_vocab`.
Each Delta input is read at one version, recorded in the run's bertxml.job_runs row and in the commits'
userMetadata; `--as-of-run RUN_ID` reads every input at the version that run read, with its ETL settings
(`etl_snapshot`, `replay_config`), and so writes the same rows however the tables have grown since.
The notes' text is not shuffled (only the few rows of repeated ids are, by the duplicate rule): it is
only joined against small, broadcast tables. It is read twice (a classification that keeps only ids,
reasons and sizes, and the labeled_notes write) and written once; benchmarks/README.md "ETL throughput"
has what that costs against a plain copy.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from typing import NamedTuple

from pyspark.sql import Column, DataFrame, Observation, functions as F
from pyspark.sql.window import Window

from bertxml.config import Config, EtlConfig
from bertxml.config_io import apply_overrides, config_from_dict
from bertxml.etl.icd import icd_reference, is_icd10_shaped, normalize_code_col
from bertxml.platform import tables as t
from bertxml.platform.runs import find_run, job_run
from bertxml.platform.warehouse import parse_utc_timestamp

log = logging.getLogger("bertxml.etl.etl")

SPLITS = ("train", "dev", "test")


# ---- notes: the paper's filters and bad rows ------------------------------------------------------------
def _trimmed_shorter_than(col: Column, n: int) -> Column:
    """length(trim(col)) < n without reading long texts twice: a text that neither starts nor ends with a
    space (the only character Spark's trim removes) is its own trim, and 4n bytes hold at least n
    characters. Counting characters is the ETL's costliest per-row step otherwise."""
    padded = col.startswith(" ") | col.endswith(" ")
    return F.when(padded | (F.octet_length(col) < 4 * n), F.length(F.trim(col)) < n).otherwise(F.lit(False))


def _blank(col: Column) -> Column:
    return col.isNull() | _trimmed_shorter_than(col, 1)


def _in_lower(col: Column, values: list[str]) -> Column:
    return F.lower(F.trim(col)).isin([v.lower() for v in values]) if values else F.lit(False)


def note_reject_reason(cfg: EtlConfig) -> Column:
    """Why a note is dropped (first rule that applies), or null when it is kept.

    Bad rows (null ids, no date, no text) come first, then the paper's filters: erroneous status,
    student author, miscellaneous type, fewer than `min_text_chars` characters.
    """
    return (F.when(_blank(F.col("note_id")), "null_note_id")
            .when(_blank(F.col("patient_id")), "null_patient_id")
            .when(_blank(F.col("encounter_id")), "null_encounter_id")
            .when(F.col("note_date").isNull(), "null_note_date")
            .when(_blank(F.col("text")), "empty_text")
            .when(_in_lower(F.col("status"), cfg.drop_statuses), "dropped_status")
            .when(_in_lower(F.col("author_role"), cfg.drop_author_roles), "dropped_author_role")
            .when(_in_lower(F.col("note_type"), cfg.drop_note_types), "dropped_note_type")
            .when(_trimmed_shorter_than(F.col("text"), cfg.min_text_chars), "short_text"))


def with_row_hash(notes: DataFrame, only: Column | None = None) -> DataFrame:
    """Add `_row_hash`, a hash of every input column (not `reason` nor `_`-prefixed helpers): equal hashes
    = identical copies of a row. With `only`, rows where it is false get a null hash (and cost nothing)."""
    row_hash = F.xxhash64(*[F.col(c) for c in notes.columns if c != "reason" and not c.startswith("_")])
    return notes.withColumn("_row_hash", row_hash if only is None else F.when(only, row_hash))


def duplicate_ids(notes: DataFrame) -> DataFrame:
    """(note_id, conflicting): every id on more than one row of `notes` (which carry `_row_hash`);
    conflicting when its copies differ. Only (note_id, hash) pairs are shuffled."""
    return (notes.groupBy("note_id")
            .agg(F.count("*").alias("_copies"), F.min("_row_hash").alias("_lo"), F.max("_row_hash").alias("_hi"))
            .filter(F.col("_copies") > 1)
            .select("note_id", (F.col("_lo") != F.col("_hi")).alias("conflicting")))


def mark_duplicates(notes: DataFrame, dups: DataFrame) -> DataFrame:
    """Set `reason` on the repeated ids of `notes` (rows with `_row_hash`; `dups` from duplicate_ids).

    Identical repeats (a re-load) keep one copy and mark the rest 'duplicate_row'; rows that share an id
    but differ are all marked 'conflicting_note_id', since we cannot tell which is right. The few repeated
    ids are broadcast, and only their rows are shuffled.
    """
    marked = notes.join(F.broadcast(dups), "note_id", "left")
    rank = F.row_number().over(Window.partitionBy("note_id").orderBy("_row_hash"))
    repeated = marked.filter(F.col("conflicting").isNotNull()).withColumn(
        "reason", F.when(F.col("conflicting"), "conflicting_note_id").when(rank > 1, "duplicate_row"))
    return marked.filter(F.col("conflicting").isNull()).unionByName(repeated).drop("conflicting")


def dedupe_notes(notes: DataFrame) -> DataFrame:
    """mark_duplicates over notes that all have `reason` null (the nightly batch's rule, in one go)."""
    hashed = with_row_hash(notes)
    return mark_duplicates(hashed, duplicate_ids(hashed)).drop("_row_hash")


# ---- diagnoses ----------------------------------------------------------------------------------------
def clean_diagnoses(diagnoses: DataFrame, reference: DataFrame, cfg: EtlConfig) -> DataFrame:
    """Normalise codes and give each diagnosis row a `reason` (null = usable).

    Codes are normalised (case, whitespace, dot) before anything is counted; 'malformed_code' is not
    ICD-10-CM shaped, 'unknown_code' is shaped but not in ICD-10-CM.
    """
    known = F.broadcast(reference.select("code", F.lit(True).alias("_known")))
    diag = diagnoses.withColumn("code", normalize_code_col(F.col("icd10_code"))).join(known, "code", "left")
    reason = (F.when(_blank(F.col("patient_id")), "null_patient_id")
              .when(_blank(F.col("encounter_id")), "null_encounter_id")
              .when(F.col("diagnosis_date").isNull(), "null_diagnosis_date")
              .when(~is_icd10_shaped(F.col("code")), "malformed_code"))
    if cfg.reject_unknown_codes:
        reason = reason.when(F.col("_known").isNull(), "unknown_code")
    return diag.withColumn("reason", reason).drop("_known")


def encounter_codes(diagnoses: DataFrame) -> DataFrame:
    """(encounter_id, codes): a note's codes are the ICD codes of its encounter (paper §4.1)."""
    return diagnoses.groupBy("encounter_id").agg(F.array_sort(F.collect_set("code")).alias("enc_codes"))


def chronic_history(diagnoses: DataFrame, reference: DataFrame, min_encounters: int = 2) -> DataFrame:
    """(patient_id, chronic ARRAY<STRUCT<code, since>>): chronic codes a patient has on at least
    `min_encounters` separate encounters, with the date of their earliest occurrence."""
    chronic = F.broadcast(reference.filter("is_chronic").select("code"))
    per_code = (diagnoses.join(chronic, "code").groupBy("patient_id", "code")
                .agg(F.size(F.collect_set("encounter_id")).alias("n_encounters"),
                     F.min("diagnosis_date").alias("since"))
                .filter(F.col("n_encounters") >= min_encounters))
    return per_code.groupBy("patient_id").agg(F.collect_list(F.struct("code", "since")).alias("chronic"))


def impute_chronic_codes(notes: DataFrame, history: DataFrame) -> DataFrame:
    """Add each chronic code of the patient to every note dated on or after its earliest occurrence.

    Expects `enc_codes` on notes; sets `codes` (encounter codes plus imputed, sorted) and
    `imputed_codes` (what was added: never a code the encounter already had, never before its date).
    """
    joined = notes.join(F.broadcast(history), "patient_id", "left")
    # Most patients have no chronic history: their notes skip the (interpreted) lambdas below.
    has_history, enc_codes = F.col("chronic").isNotNull(), F.col("enc_codes")
    active = F.transform(F.filter(F.col("chronic"), lambda c: c["since"] <= F.col("note_date")),
                         lambda c: c["code"])
    none = F.slice(enc_codes, 1, 0)  # an empty array of enc_codes' type
    imputed = F.when(has_history, F.array_sort(F.array_except(active, enc_codes))).otherwise(none)
    return (joined.withColumn("imputed_codes", imputed)
            .withColumn("codes", F.when(has_history, F.array_sort(F.array_union(enc_codes, F.col("imputed_codes"))))
                        .otherwise(enc_codes))
            .drop("chronic", "enc_codes"))


# ---- splits and labels -------------------------------------------------------------------------------
def split_of(patient_id: str, salt: str, fractions=(0.7, 0.1, 0.2)) -> str:
    """Pure-Python twin of assign_split, for tests and for scoring outside Spark."""
    u = int(hashlib.sha256(f"{salt}:{patient_id}".encode()).hexdigest()[:8], 16) / 2 ** 32
    return SPLITS[0] if u < fractions[0] else SPLITS[1] if u < fractions[0] + fractions[1] else SPLITS[2]


def assign_split(patient_id: Column, salt: str, fractions=(0.7, 0.1, 0.2)) -> Column:
    """train/dev/test from a salted hash of the patient id: stable across reruns and as the warehouse
    grows, and no patient is ever in two splits."""
    if len(fractions) != 3 or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"split_fractions must be three numbers summing to 1, got {fractions}")
    digest = F.sha2(F.concat(F.lit(f"{salt}:"), patient_id), 256)
    u = F.conv(F.substring(digest, 1, 8), 16, 10).cast("double") / float(2 ** 32)
    return (F.when(u < fractions[0], SPLITS[0])
            .when(u < fractions[0] + fractions[1], SPLITS[1]).otherwise(SPLITS[2]))


def build_label_vocab(labeled_notes: DataFrame, reference: DataFrame, min_code_count: int) -> DataFrame:
    """Codes with MORE than min_code_count train occurrences, with a stable label_index (code order)."""
    counts = (labeled_notes.filter(F.col("split") == "train")
              .select(F.explode("codes").alias("code"))
              .groupBy("code").agg(F.count("*").alias("train_count"))
              .filter(F.col("train_count") > min_code_count))
    vocab = counts.join(F.broadcast(reference), "code", "left")
    index = F.row_number().over(Window.orderBy("code")) - 1
    return vocab.select(index.cast("int").alias("label_index"), "code", "description",
                        F.col("train_count").cast("long"),
                        F.coalesce(F.col("is_chronic"), F.lit(False)).alias("is_chronic"))


# ---- the whole transformation --------------------------------------------------------------------------
def reject_rows(df: DataFrame, source: str, job: str, batch: str, run_id: str) -> DataFrame:
    """Rows with a reason, as bertxml.rejects rows: identifiers and a JSON record with the text's size in
    bytes (`text_bytes`) instead of the text."""
    record_cols = [F.col(c) for c in df.columns if c not in ("text", "reason")]
    if "text" in df.columns:
        record_cols.append(F.octet_length("text").alias("text_bytes"))
    get = lambda c: F.col(c) if c in df.columns else F.lit(None).cast("string")  # noqa: E731
    return df.filter(F.col("reason").isNotNull()).select(
        F.lit(job).alias("job"), F.lit(source).alias("source"), get("note_id").alias("note_id"),
        get("patient_id").alias("patient_id"), get("encounter_id").alias("encounter_id"),
        get("icd10_code").alias("icd10_code"), F.col("reason"),
        F.to_json(F.struct(*record_cols)).alias("record"), F.lit(batch).alias("batch"),
        F.lit(run_id).alias("run_id"), F.current_timestamp().alias("rejected_at"))


class EtlFrames(NamedTuple):
    """What label_notes returns: `labeled` (bertxml.labeled_notes rows) and `rejects` (bertxml.rejects
    rows), both lazy, and `notes_read`, how many note rows it classified: each is either labeled or
    rejected, exactly once."""
    labeled: DataFrame
    rejects: DataFrame
    notes_read: int


def label_notes(notes: DataFrame, diagnoses: DataFrame, reference: DataFrame, cfg: EtlConfig,
                run_id: str = "-") -> EtlFrames:
    """The ETL as a transformation: labeled notes and rejects from input-schema notes and diagnoses.

    Runs a few Spark jobs now, into local checkpoints:
    - the diagnoses, cleaned, then the encounter codes and the patients' chronic history;
    - the note ids that occur on more than one row (read from the id column alone);
    - every note classified WITHOUT its text (ids, reason, size), except the rows of repeated ids, which
      keep their text and a row hash so the duplicate rule can choose among them;
    - those rows, marked by the duplicate rule (`mark_duplicates`).
    The rejects read only these; `labeled` reads the text once more, in its write, labels
    the notes there (split, codes, imputed codes) and takes the repeated ids' rows from the checkpoint.
    """
    diag = clean_diagnoses(diagnoses, reference, cfg).localCheckpoint()
    good_diag = diag.filter(F.col("reason").isNull())
    codes = encounter_codes(good_diag).localCheckpoint()
    history = chronic_history(good_diag, reference, cfg.chronic_min_encounters).localCheckpoint()
    repeated = (notes.groupBy("note_id").agg(F.count("*").alias("_copies")).filter(F.col("_copies") > 1)
                .select(F.col("note_id").alias("note_id"), F.lit(True).alias("_repeated")).localCheckpoint())
    is_repeated = F.col("_repeated").isNotNull()
    has_codes = F.broadcast(codes.select("encounter_id", F.lit(True).alias("_has_codes")))
    classified = (with_row_hash(notes.join(F.broadcast(repeated), "note_id", "left"), only=is_repeated)
                  .join(has_codes, "encounter_id", "left")
                  .withColumn("reason", note_reject_reason(cfg))
                  .withColumn("text_bytes", F.octet_length("text"))
                  .withColumn("text", F.when(is_repeated, F.col("text")))
                  .localCheckpoint())
    copies = classified.filter(is_repeated & F.col("reason").isNull())
    marked = mark_duplicates(copies, duplicate_ids(copies)).localCheckpoint()  # the few repeated ids' rows
    decided = classified.filter(~is_repeated | F.col("reason").isNotNull()).unionByName(marked)
    decided = decided.withColumn("reason", F.coalesce(
        F.col("reason"), F.when(F.col("_has_codes").isNull(), F.lit("no_diagnoses"))))

    once = (notes.withColumn("reason", note_reject_reason(cfg)).filter(F.col("reason").isNull())
            .join(F.broadcast(repeated), "note_id", "left_anti"))
    kept_copies = marked.filter(F.col("reason").isNull()).select(*once.columns)  # the inner join drops no_diagnoses
    labeled = impute_chronic_codes(once.unionByName(kept_copies).join(F.broadcast(codes), "encounter_id"), history)
    labeled = labeled.withColumn("split", assign_split(F.col("patient_id"), cfg.split_salt, tuple(cfg.split_fractions)))

    checked = decided.select(*[c for c in notes.columns if c != "text"], "text_bytes", "reason")
    rejects = reject_rows(checked, "notes", "etl", "all", run_id).unionByName(
        reject_rows(diag.drop("code"), "diagnoses", "etl", "all", run_id))
    return EtlFrames(labeled.select(*t.LABELED_NOTES_SCHEMA.fieldNames()), rejects, classified.count())


# ---- replaying an earlier run -------------------------------------------------------------------------
INPUTS = ("notes", "diagnoses")


class ReplayError(ValueError):
    """An --as-of-run that cannot be replayed: no such run, not a successful ETL run, or one that read an
    input with no Delta version (a parquet/csv/json file) or another source than the one given."""


class EtlSnapshot(NamedTuple):
    """What an earlier ETL run read: {'source', 'version'} per input, and its ETL settings."""
    run_id: str
    inputs: dict
    etl: dict


def etl_snapshot(wh, run_id: str) -> EtlSnapshot:
    """The snapshot the ETL run `run_id` read, from its bertxml.job_runs row; ReplayError naming the run
    when there is no such successful ETL run or an input of it has no Delta version to read again."""
    runs = wh.name(t.JOB_RUNS)
    run = find_run(wh, run_id)
    if run is None:
        raise ReplayError(f"run {run_id} is not in {runs}: give the run_id of an etl run (SELECT run_id, "
                          f"started_at, inputs FROM {runs} WHERE job = 'etl' AND status = 'succeeded')")
    if run["job"] != "etl":
        raise ReplayError(f"run {run_id} is a {run['job']} run: --as-of-run takes an etl run")
    if run["status"] != "succeeded":
        raise ReplayError(f"etl run {run_id} did not succeed ({run['status']}): it wrote no training set to rebuild")
    inputs = {}
    for what in INPUTS:
        read = run["inputs"].get(what) or {}
        if read.get("version") is None:
            raise ReplayError(f"etl run {run_id} recorded no Delta version of its {what} "
                              f"({read.get('source') or 'source not recorded'}): only a Delta table's version "
                              "can be read again (a parquet/csv/json file cannot)")
        inputs[what] = {"source": read["source"], "version": int(read["version"])}
    return EtlSnapshot(run_id, inputs, (run["config"] or {}).get("etl") or {})


def replay_config(cfg: Config, snapshot: EtlSnapshot) -> Config:
    """A copy of cfg with the ETL settings the snapshot's run used (the filters, the split's salt, the
    chronic source, the label threshold: each changes the rows). A setting that differs from cfg's is
    logged; one this bertxml no longer has is left out, one it added since keeps cfg's value."""
    known = {f.name for f in dataclasses.fields(EtlConfig)}
    dropped = sorted(set(snapshot.etl) - known)
    if dropped:
        log.warning("run %s: etl settings %s are not settings of this bertxml: left out", snapshot.run_id, dropped)
    out = apply_overrides(config_from_dict(cfg.to_dict()),
                          {"etl": {k: v for k, v in snapshot.etl.items() if k in known}})
    for key in sorted(known):
        if getattr(out.etl, key) != getattr(cfg.etl, key):
            log.warning("etl.%s: run %s used %r, this config says %r: replaying the run's", key,
                        snapshot.run_id, getattr(out.etl, key), getattr(cfg.etl, key))
    return out


def run_etl(wh, cfg: Config, notes_source: str | None = None, diagnoses_source: str | None = None,
            as_of_run: str | None = None, as_of_timestamp: str | None = None) -> dict:
    """Read the inputs, check their schemas (before anything is written), write the three tables.

    Each Delta input is read at one version: its latest, or its version as of `as_of_timestamp`, or
    (`as_of_run`, an earlier ETL run's id) the version that run read, with that run's source and ETL
    settings (`etl_snapshot`, `replay_config`): the replay writes the rows that run wrote, however the
    tables have grown since. The versions read are recorded in the run's bertxml.job_runs row and in the
    userMetadata of each table's commit.

    Only the labeled_notes write reads the notes' text. The rows it wrote (its Delta commit says) must
    equal the notes read less the notes rejected: checked before anything else is written. The
    per-split counts are observed as the write goes; the label vocabulary is read back from what was
    written, without the text. Meanwhile Delta loads the three output tables' state (`wh.preloaded`).
    """
    if as_of_run and as_of_timestamp:
        raise ValueError("read as of a run or as of a timestamp, not both")
    if as_of_timestamp:
        parse_utc_timestamp(as_of_timestamp)  # a bad one stops the job before it starts
    sources = {"notes": notes_source or cfg.warehouse.notes, "diagnoses": diagnoses_source or cfg.warehouse.diagnoses}
    versions = dict.fromkeys(INPUTS)
    if as_of_run:
        snapshot = etl_snapshot(wh, as_of_run)
        for what, given in (("notes", notes_source), ("diagnoses", diagnoses_source)):
            recorded = snapshot.inputs[what]
            if given and given != recorded["source"]:
                raise ReplayError(f"etl run {as_of_run} read its {what} from {recorded['source']}, not {given}: "
                                  f"leave out --{what} to replay it")
            sources[what], versions[what] = recorded["source"], recorded["version"]
        cfg = replay_config(cfg, snapshot)
        log.info("replaying etl run %s: %s", as_of_run,
                 ", ".join(f"{what} {r['source']} version {r['version']}" for what, r in snapshot.inputs.items()))
    spark = wh.spark
    labeled_name, vocab_name, rejects_name = (wh.name(n) for n in (t.LABELED_NOTES, t.LABEL_VOCAB, t.REJECTS))
    with job_run(wh, "etl", cfg) as run, wh.preloaded([labeled_name, vocab_name, rejects_name]):
        notes, notes_read = wh.read_source(sources["notes"], t.NOTES_SCHEMA, "notes", versions["notes"],
                                           as_of_timestamp)
        diagnoses, diag_read = wh.read_source(sources["diagnoses"], t.DIAGNOSES_SCHEMA, "diagnoses",
                                              versions["diagnoses"], as_of_timestamp)
        run.inputs.update({"notes": notes_read, "diagnoses": diag_read})
        if as_of_run:
            for read in run.inputs.values():
                read["as_of_run"] = as_of_run
        reference = icd_reference(spark, cfg.etl.chronic_source)
        frames = label_notes(notes, diagnoses, reference, cfg.etl, run.run_id)
        lineage = json.dumps({"run_id": run.run_id, "inputs": run.inputs})
        # Counted now from the checkpoints (no text); written last.
        counts = sorted(tuple(r) for r in frames.rejects.groupBy("source", "reason").agg(F.count("*")).collect())
        reasons = {f"{source}:{reason}": n for source, reason, n in counts}
        kept = frames.notes_read - sum(n for source, _, n in counts if source == "notes")

        by_split = Observation("labeled_notes_by_split")  # counted as the write goes, not by another read
        labeled = frames.labeled.observe(
            by_split, *[F.count_if(F.col("split") == s).alias(s) for s in SPLITS],
            F.count_if(F.size("imputed_codes") > 0).alias("imputed"))
        labeled_version = wh.write(labeled, labeled_name, metadata=lineage)
        written = wh.rows_written(labeled_name, labeled_version)
        if written is not None and written != kept:
            raise RuntimeError(f"{labeled_name} version {labeled_version} holds {written} notes but the "
                               f"{frames.notes_read} notes read less those rejected are {kept}: did a file source "
                               "change while the job read it? The vocabulary and rejects were not written.")
        split_counts = by_split.get
        labels = wh.table(labeled_name, labeled_version).select("split", "codes")
        vocab_version = wh.write(build_label_vocab(labels, reference, cfg.etl.min_code_count),
                                 vocab_name, metadata=lineage)
        vocab_codes = wh.rows_written(vocab_name, vocab_version)
        rejects = frames.rejects.coalesce(spark.sparkContext.defaultParallelism)  # at most one file a core
        rejects_version = wh.write(rejects, rejects_name, replace_where="job = 'etl'",
                                   metadata=lineage, partition_by=t.REJECTS_PARTITIONS)
        run.outputs.update({labeled_name: labeled_version, vocab_name: vocab_version, rejects_name: rejects_version})
        run.count("labeled_notes", kept)
        run.count("labeled_notes_by_split", {s: split_counts[s] for s in SPLITS if split_counts[s]})
        run.count("notes_with_imputed_codes", split_counts["imputed"])
        run.count("label_vocab_codes", vocab_codes)
        run.count("rejects", sum(reasons.values()))
        run.count("rejects_by_reason", reasons)
        if not vocab_codes:
            log.warning("the label vocabulary is empty: no code has more than %d train occurrences "
                        "(lower etl.min_code_count)", cfg.etl.min_code_count)
        return {"run_id": run.run_id, **run.counts, "outputs": run.outputs}
