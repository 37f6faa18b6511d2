"""`bertxml demo` / `make demo`: the main job end to end on the embedded default.

The story is a nightly feed after a pause: the scheduler has been off for the warehouse's last
CATCH_UP_NIGHTS nights. The demo
1. generates the warehouse (`conf/local.yaml`: 1,500 notes, six weeks of a small hospital) in two commits
   per table: the history, then the paused nights' notes and diagnoses landing late;
2. retrains (ETL, vocabulary, chunks, pretraining, fine-tuning, dev AUC) on the warehouse as it stood
   when the history had landed (`--as-of-timestamp`), so the model has seen none of the nights it then
   scores;
   The run is logged to the embedded MLflow store (WORKDIR/mlflow) and the model registered as a version of
   `bertxml`, which the demo then promotes to the `champion` alias (`bertxml promote VERSION`);
3. catches up as a restarted scheduler would: one `bertxml score --date D --model models:/bertxml@champion`
   run per missed night, each also writing the night's drift against the training set (`bertxml.night_drift`);
4. evaluates those nights (`bertxml evaluate --from --to --level both`): one AUC report per night and one
   over the span, for the notes and for their encounters;
then prints example SQL an analyst would type, with its output. Sizes come from the config (a tiny model
on CPU).
"""
from __future__ import annotations

import datetime as dt
import logging

from bertxml.etl.generate import run_generate
from bertxml.etl.span import last_date
from bertxml.models.registry import MODELS_SCHEME, registered_version_of, run_promote
from bertxml.platform.sql import format_rows
from bertxml.reports.evaluate import run_evaluate
from bertxml.retrain import run_retrain
from bertxml.scoring.score import run_score

log = logging.getLogger("bertxml.demo")

CATCH_UP_NIGHTS = 3       # the generated warehouse's last three nights: Monday to Wednesday, 2025-12-29..31

EXAMPLE_SQL = [
    ("Notes per split, with imputed chronic codes",
     """SELECT split, count(*) AS notes, round(avg(size(codes)), 2) AS codes_per_note,
               sum(CASE WHEN size(imputed_codes) > 0 THEN 1 ELSE 0 END) AS notes_with_imputed
        FROM bertxml.labeled_notes GROUP BY split ORDER BY split"""),
    ("The most frequent codes in the label vocabulary",
     """SELECT label_index, code, description, train_count, is_chronic
        FROM bertxml.label_vocab ORDER BY train_count DESC LIMIT 8"""),
    ("Why rows were rejected",
     """SELECT job, source, reason, count(*) AS n FROM bertxml.rejects
        GROUP BY job, source, reason ORDER BY n DESC"""),
    ("Notes scored per night",
     """SELECT note_date, count(*) AS notes, count(DISTINCT patient_id) AS patients,
               round(avg(size(predicted_codes)), 2) AS codes_per_note
        FROM bertxml.predictions GROUP BY note_date ORDER BY note_date"""),
    ("Last night's predicted codes, each with its review band",
     """SELECT note_id, encounter_id, code, description, round(CAST(probability AS DOUBLE), 3) AS probability, band
        FROM bertxml.predicted_codes WHERE note_date = (SELECT max(note_date) FROM bertxml.predictions)
        ORDER BY note_id, probability DESC LIMIT 10"""),
    ("Drift of the last night against the training set, before any label (bertxml.night_drift)",
     """SELECT note_date, kind, name, round(value, 3) AS value, round(baseline, 3) AS baseline,
               round(drift, 3) AS drift, round(`limit`, 3) AS `limit`, flagged, n_notes, detail FROM bertxml.night_drift
        WHERE kind IN ('night', 'output', 'input')
          AND note_date = (SELECT max(note_date) FROM bertxml.night_drift) ORDER BY kind = 'night' DESC, kind, name"""),
    ("Last night's coder workload: codes to review per encounter (each code's max over the encounter's notes)",
     """SELECT encounter_id, n_notes, first_note_date, last_note_date,
               size(filter(predicted_bands, b -> b = 'review')) AS to_review,
               size(filter(predicted_bands, b -> b = 'auto')) AS auto_accepted
        FROM bertxml.encounter_predictions
        WHERE encounter_id IN (SELECT encounter_id FROM bertxml.predictions
                               WHERE note_date = (SELECT max(note_date) FROM bertxml.predictions))
        ORDER BY to_review DESC, encounter_id LIMIT 8"""),
    ("Why: last night's evidence, each predicted code's most attended spans as character offsets (no text)",
     """SELECT note_id, code, rank, char_start, char_end, round(weight, 3) AS weight FROM bertxml.evidence
        WHERE note_date = (SELECT max(note_date) FROM bertxml.evidence) ORDER BY note_id, code, rank LIMIT 9"""),
    ("Operating points on dev of the most frequent codes (auto-accept and review thresholds)",
     """SELECT code, dev_support, round(threshold, 3) AS f1_threshold, round(auto_threshold, 3) AS auto_threshold,
               round(auto_precision, 2) AS auto_precision, round(review_threshold, 3) AS review_threshold,
               round(review_recall, 2) AS review_recall
        FROM bertxml.model_labels ORDER BY dev_support DESC NULLS LAST, code LIMIT 8"""),
    ("The newest AUC report per dataset: each night and the span, for notes and for encounters",
     """SELECT dataset, n_notes, round(micro_auc, 3) AS micro_auc, round(macro_auc, 3) AS macro_auc,
               n_codes_scored, n_codes_skipped FROM bertxml.latest_auc ORDER BY dataset"""),
]


REGISTRY_SQL = [
    ("Who promoted which registered version, and when",
     """SELECT get_json_object(counts, '$.alias') AS alias, get_json_object(counts, '$.version') AS version,
               get_json_object(counts, '$.model_version') AS model_version,
               get_json_object(counts, '$.promoted_by') AS promoted_by,
               get_json_object(counts, '$.promoted_at') AS promoted_at
        FROM bertxml.job_runs WHERE job = 'promote' AND status = 'succeeded' ORDER BY started_at"""),
]


def print_examples(wh, examples) -> None:
    for title, query in examples:
        df = wh.spark.sql(query)
        print(f"\n-- {title}\n{' '.join(query.split())}\n")
        print(format_rows(df.columns, df.collect(), "table"))


def catch_up_nights(n: int = CATCH_UP_NIGHTS) -> list[dt.date]:
    """The generated warehouse's last n nights, oldest first: what a scheduler paused for n days misses."""
    if n < 1:
        raise ValueError(f"the demo catches up at least one night, got {n}")
    last = last_date()
    return [last - dt.timedelta(days=k) for k in range(n - 1, -1, -1)]


def history_landed_at(wh, generated: dict) -> str:
    """The time the history had landed in both generated tables: the later of their history commits.
    As of it, each table holds only the history; the late nights commit after it."""
    return max(wh.commit_time(table, version) for table, version in generated["history_versions"].items())


def run_demo(wh) -> int:
    cfg = wh.cfg
    nights = catch_up_nights()
    log.info("demo 1/4: generating %d notes into %s; the nights %s..%s land after the history",
             cfg.generate.notes, wh.workdir, nights[0], nights[-1])
    landed_at = history_landed_at(wh, run_generate(wh, cfg.generate, land_from=nights[0]))
    log.info("demo 2/4: retrain on the warehouse as of %s UTC, before the late nights landed (ETL -> "
             "vocabulary -> chunks -> pretraining -> fine-tuning -> dev AUC)", landed_at)
    model_dir = run_retrain(wh, cfg, as_of_timestamp=landed_at)
    model, registered = model_dir, None
    if cfg.mlflow.log_runs:
        registered = registered_version_of(cfg, wh.workdir, model_dir)
        log.info("demo 2/4: promoting %s version %s to champion", cfg.mlflow.model_name, registered)
        run_promote(wh, cfg, registered, alias="champion")
        model = f"{MODELS_SCHEME}{cfg.mlflow.model_name}@champion"
    for k, night in enumerate(nights, 1):
        log.info("demo 3/4: the scheduler catches up, night %d of %d: scoring %s with %s",
                 k, len(nights), night, model)
        run_score(wh, cfg, date=night, model_dir=model)
    log.info("demo 4/4: AUC report per night and over %s..%s", nights[0], nights[-1])
    run_evaluate(wh, cfg, date_from=nights[0], date_to=nights[-1], model_dir=model, level="both")
    print_examples(wh, EXAMPLE_SQL + (REGISTRY_SQL if registered else []))
    print(f"\nmodel: {model_dir}" + (f"\nregistered: {model} = version {registered} (MLflow store "
                                      f"{wh.workdir / 'mlflow'})" if registered else "")
          + f"\nwarehouse: {wh.workdir}")
    return 0
