"""Table names and schemas: the one place the warehouse's shape is written down.

Input tables (the hospital's): notes and diagnoses. Output tables (ours) live in the `bertxml` schema
(WarehouseConfig.schema). Each output table's columns are documented in the README.
"""
from pyspark.sql.types import (ArrayType, BooleanType, DateType, DoubleType, FloatType, IntegerType, LongType,
                               StringType, StructField, StructType, TimestampType)

# ---- inputs -------------------------------------------------------------------------------------------
NOTES_SCHEMA = StructType([
    StructField("note_id", StringType()),
    StructField("patient_id", StringType()),
    StructField("encounter_id", StringType()),
    StructField("note_date", DateType()),
    StructField("note_type", StringType()),
    StructField("author_role", StringType()),
    StructField("status", StringType()),
    StructField("text", StringType()),
])

DIAGNOSES_SCHEMA = StructType([
    StructField("patient_id", StringType()),
    StructField("encounter_id", StringType()),
    StructField("icd10_code", StringType()),
    StructField("diagnosis_date", DateType()),
])

# ---- outputs (short names; qualified with WarehouseConfig.schema) --------------------------------------
LABELED_NOTES = "labeled_notes"
LABEL_VOCAB = "label_vocab"
REJECTS = "rejects"
JOB_RUNS = "job_runs"
CHUNKS = "chunks"
# Our output tables that hold note text (PHI): labeled_notes has it verbatim, and chunks' token ids
# decode back to it with the vocabulary. With the input notes table (WarehouseConfig.notes) they are
# what `bertxml sql-server` does not serve unless the operator opts in.
TEXT_TABLES = (LABELED_NOTES, CHUNKS)
PREDICTIONS = "predictions"
AUC_REPORT = "auc_report"
CODE_AUC = "code_auc"
MODEL_COMPARISON = "model_comparison"

LABELED_NOTES_SCHEMA = StructType([
    StructField("note_id", StringType(), False),
    StructField("patient_id", StringType(), False),
    StructField("encounter_id", StringType(), False),
    StructField("note_date", DateType(), False),
    StructField("split", StringType(), False),
    StructField("text", StringType(), False),
    StructField("codes", ArrayType(StringType(), False), False),
    StructField("imputed_codes", ArrayType(StringType(), False), False),
])

LABEL_VOCAB_SCHEMA = StructType([
    StructField("label_index", IntegerType(), False),
    StructField("code", StringType(), False),
    StructField("description", StringType()),
    StructField("train_count", LongType(), False),
    StructField("is_chronic", BooleanType(), False),
])

# A reject keeps the row's identifiers and a reason, never its text (PHI): `record` is the row as JSON
# with the text replaced by its length, so the source row can be found and fixed.
REJECTS_SCHEMA = StructType([
    StructField("job", StringType(), False),          # etl | score
    StructField("source", StringType(), False),       # notes | diagnoses
    StructField("note_id", StringType()),
    StructField("patient_id", StringType()),
    StructField("encounter_id", StringType()),
    StructField("icd10_code", StringType()),
    StructField("reason", StringType(), False),
    StructField("record", StringType()),
    StructField("batch", StringType(), False),        # what the run covered: 'all' for the ETL, a date for a night
    StructField("run_id", StringType(), False),
    StructField("rejected_at", TimestampType(), False),
])
# Partitioned by job, so the ETL's and a night's replaceWhere drop whole files by their partition (no scan).
# A rejects table that an earlier bertxml created unpartitioned keeps working: Delta scans it to replace rows.
REJECTS_PARTITIONS = ("job",)

JOB_RUNS_SCHEMA = StructType([
    StructField("run_id", StringType(), False),
    StructField("job", StringType(), False),
    StructField("started_at", TimestampType(), False),
    StructField("finished_at", TimestampType(), False),
    StructField("status", StringType(), False),
    StructField("inputs", StringType()),              # JSON: table -> Delta version read
    StructField("outputs", StringType()),             # JSON: table -> Delta version written
    StructField("counts", StringType()),              # JSON: what the job counted
    StructField("config", StringType()),              # JSON: the resolved config
])

CHUNKS_SCHEMA = StructType([
    StructField("note_id", StringType(), False),
    StructField("split", StringType(), False),
    StructField("max_len", IntegerType(), False),     # 512 or 1,024: one table holds both chunkings
    StructField("chunk_index", IntegerType(), False),
    StructField("input_ids", ArrayType(IntegerType(), False), False),   # [CLS] ... [SEP], at most max_len
    StructField("label_ids", ArrayType(IntegerType(), False), False),   # label_vocab.label_index of the codes
    StructField("sentence_starts", ArrayType(IntegerType(), False), False),  # positions in input_ids
])

TOP_CODE = StructType([StructField("code", StringType()), StructField("probability", FloatType())])

PREDICTIONS_SCHEMA = StructType([
    StructField("note_id", StringType(), False),
    StructField("patient_id", StringType()),
    StructField("note_date", DateType()),
    StructField("model_version", StringType(), False),
    StructField("run_id", StringType(), False),
    StructField("scored_at", TimestampType(), False),
    StructField("probabilities", ArrayType(FloatType(), False)),
    StructField("top_codes", ArrayType(TOP_CODE)),
    StructField("predicted_codes", ArrayType(StringType())),
    StructField("n_chunks", IntegerType()),           # chunks scored (the note's probability is their max)
    StructField("truncated", BooleanType()),          # longer than score.max_chunks_per_note: first chunks only
    # Added after the first release, so last: a table an earlier bertxml created gains them on its next
    # write (Delta schema evolution), its older rows null.
    StructField("encounter_id", StringType()),
    StructField("predicted_bands", ArrayType(StringType())),  # 'auto' | 'review', one per predicted_codes entry
])

# Partitioned by note_date, so a night's MERGE reads and rewrites only that night's files. A predictions table
# that an earlier bertxml created unpartitioned keeps working: the MERGE then skips files by their note_date
# statistics instead.
PREDICTIONS_PARTITIONS = ("note_date",)

# `bertxml score` with score.evidence: for each predicted code of a note, the spans of the note its label attention
# weighs most (paper §4.5), as character offsets into the note's text, never the text. Written with the night's
# predictions, the same way (replaceWhere model_version and the nights), so it always matches them.
EVIDENCE = "evidence"

EVIDENCE_SCHEMA = StructType([
    StructField("note_id", StringType(), False),
    StructField("note_date", DateType()),             # the night: the partition a rerun replaces
    StructField("model_version", StringType(), False),
    StructField("code", StringType(), False),
    StructField("rank", IntegerType(), False),        # 1 = the span with the most of the code's attention
    StructField("char_start", IntegerType(), False),  # [char_start, char_end) in the note's text, 0-based
    StructField("char_end", IntegerType(), False),    # characters: substring(text, char_start + 1, char_end - char_start)
    StructField("weight", FloatType(), False),        # the code's attention mass on the span (eq. 2, in its chunk)
    StructField("run_id", StringType(), False),
])
EVIDENCE_PARTITIONS = ("note_date",)

# One evidence span as the scoring UDF returns it, per note (an array of these).
EVIDENCE_SPAN = StructType([StructField("code", StringType()), StructField("rank", IntegerType()),
                            StructField("char_start", IntegerType()), StructField("char_end", IntegerType()),
                            StructField("weight", FloatType())])

MODEL_LABELS = "model_labels"  # each scored model version's label vocabulary, for the views

MODEL_LABELS_SCHEMA = StructType([
    StructField("model_version", StringType(), False),
    StructField("label_index", IntegerType(), False),
    StructField("code", StringType(), False),
    StructField("description", StringType()),
    StructField("threshold", FloatType()),            # F1-max on dev: predicted at or above it
    # The code's operating points on dev (operating_points.json; null where the folder has none, or the
    # code has fewer than bands.min_support dev positives: then it is always 'review').
    StructField("dev_support", IntegerType()),        # dev notes with the code
    StructField("f1_precision", FloatType()),
    StructField("f1_recall", FloatType()),
    StructField("auto_threshold", FloatType()),       # 'auto' at or above it (reaches bands.auto_precision)
    StructField("auto_precision", FloatType()),
    StructField("auto_recall", FloatType()),
    StructField("review_threshold", FloatType()),     # predicted ('review') down to it (reaches bands.review_recall)
    StructField("review_precision", FloatType()),
    StructField("review_recall", FloatType()),
])

# `bertxml score`: per encounter and model version, each code's maximum over the encounter's scored notes,
# recomputed from all of them whenever one of its notes' nights is scored (MERGE on encounter_id,
# model_version; an encounter left with no scored note loses its row).
ENCOUNTER_PREDICTIONS = "encounter_predictions"

ENCOUNTER_PREDICTIONS_SCHEMA = StructType([
    StructField("encounter_id", StringType(), False),
    StructField("patient_id", StringType()),
    StructField("model_version", StringType(), False),
    StructField("first_note_date", DateType()),
    StructField("last_note_date", DateType()),
    StructField("n_notes", IntegerType(), False),     # scored notes the maximum is over
    StructField("probabilities", ArrayType(FloatType(), False)),
    StructField("top_codes", ArrayType(TOP_CODE)),
    StructField("predicted_codes", ArrayType(StringType())),
    StructField("predicted_bands", ArrayType(StringType())),  # 'auto' | 'review', one per predicted code
    StructField("updated_at", TimestampType(), False),
])

# `bertxml evaluate`: one row per (model_version, dataset), replaced by the next run of that model version on
# that dataset (MERGE); the view bertxml.latest_auc picks the newest (tables an earlier bertxml appended to).
# dataset: 'dev' | 'test' | 'date:YYYY-MM-DD' (one night) | 'dates:FROM..TO' (a range; its nights get rows too).
AUC_REPORT_SCHEMA = StructType([
    StructField("run_id", StringType(), False),
    StructField("model_version", StringType(), False),
    StructField("dataset", StringType(), False),
    StructField("micro_auc", DoubleType()),           # over every (note, code) pair
    StructField("macro_auc", DoubleType()),           # mean over codes with a positive and a negative note
    StructField("macro_auc_low_freq", DoubleType()),  # the same over codes with < low_freq_threshold train notes
    StructField("n_codes_scored", IntegerType()),
    StructField("n_codes_skipped", IntegerType()),    # no positive or no negative note in the set
    StructField("n_codes_low_freq", IntegerType()),   # scored codes counted in macro_auc_low_freq
    StructField("n_notes", LongType()),
    StructField("micro_f1", DoubleType()),            # at the model's per-code thresholds
    StructField("macro_f1", DoubleType()),            # mean over codes with a positive note
    StructField("p_at_5", DoubleType()),
    StructField("p_at_8", DoubleType()),
    StructField("created_at", TimestampType(), False),
])

# Per-code AUCs of a run's main dataset (null auc: skipped); the histogram of paper Figure 2 is drawn from it.
CODE_AUC_SCHEMA = StructType([
    StructField("run_id", StringType(), False),
    StructField("model_version", StringType(), False),
    StructField("dataset", StringType(), False),
    StructField("code", StringType(), False),
    StructField("description", StringType()),
    StructField("auc", DoubleType()),
    StructField("n_pos", LongType()),
    StructField("train_count", LongType()),
])

# `bertxml compare` (paper Tables 2 and 3): one row per (run_id, model, max_len), every model of a run trained
# on the same pinned tables and measured on the same notes with the same metric function. A run's rows are
# written in one transaction; a rerun is a new run_id (the newest per model: ORDER BY created_at DESC).
MODEL_COMPARISON_SCHEMA = StructType([
    StructField("run_id", StringType(), False),
    StructField("dataset", StringType(), False),      # the split measured: 'dev' | 'test'
    StructField("model", StringType(), False),        # logreg | bilstm | cls | bertxml | minilm-bertxml | minilm-cls
    StructField("max_len", IntegerType(), False),     # chunk length (baselines: the first max_len tokens)
    StructField("micro_auc", DoubleType()),
    StructField("macro_auc", DoubleType()),
    StructField("macro_auc_low_freq", DoubleType()),  # Table 3: codes with < low_freq_threshold train notes
    StructField("n_codes", IntegerType()),            # codes with a positive and a negative note (in macro_auc)
    StructField("n_codes_low_freq", IntegerType()),
    StructField("low_freq_threshold", IntegerType()),
    StructField("n_notes", LongType()),
    StructField("micro_f1", DoubleType()),            # at the model's dev-tuned thresholds
    StructField("train_seconds", DoubleType()),       # the training loop (manifest.train_seconds)
    StructField("parameters", LongType()),
    StructField("model_version", StringType(), False),
    StructField("model_dir", StringType(), False),    # scorable: `bertxml score|evaluate --model DIR`
    StructField("initialised_from", StringType()),    # encoder or checkpoint folder; null for baselines
    StructField("inputs", StringType()),              # JSON: table -> Delta version the model was trained on
    StructField("created_at", TimestampType(), False),
])

# `bertxml score` (bertxml.scoring.drift): each scored night against the model's training profile, one row per
# (note_date, model_version, kind, name); a night's rows for a model version are replaced by its next run.
# kind: 'night' (name 'summary': value = measures flagged) | 'output' (code_psi, codes_per_note, codes_shifted)
# | 'input' (note_length, oov_share, note_type) | 'code' (name = the code) | 'note_type' (name = the type).
NIGHT_DRIFT = "night_drift"

NIGHT_DRIFT_SCHEMA = StructType([
    StructField("note_date", DateType(), False),
    StructField("model_version", StringType(), False),
    StructField("kind", StringType(), False),
    StructField("name", StringType(), False),
    StructField("value", DoubleType()),               # the night's figure
    StructField("baseline", DoubleType()),            # the training set's (codes: the model's rate on dev)
    StructField("train_rate", DoubleType()),          # code rows: the code's share of train notes
    StructField("drift", DoubleType()),               # what the limit applies to (a PSI, a difference)
    StructField("limit", DoubleType()),               # the config's limit; null: not judged on its own
    StructField("flagged", BooleanType(), False),     # past the limit, on a night with >= drift.min_notes
    StructField("n_notes", LongType(), False),        # notes scored that night
    StructField("detail", StringType()),              # why not measured, which measures flagged, new types
    StructField("run_id", StringType(), False),
    StructField("computed_at", TimestampType(), False),
])
