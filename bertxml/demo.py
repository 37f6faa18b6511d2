"""`bertxml demo` / `make demo`: the main job end to end on the embedded default.

generate a synthetic warehouse -> retrain (ETL, vocabulary, chunks, pretraining, fine-tuning, dev AUC)
-> score one night's notes -> AUC report for that night -> example SQL an analyst would type, printed
with its output. Sizes come from the config (`conf/local.yaml`: a tiny model on CPU).
"""
from __future__ import annotations

import logging

from bertxml.generate import run_generate
from bertxml.sql import format_rows

log = logging.getLogger("bertxml.demo")

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
    ("Last night's predicted codes",
     """SELECT note_id, note_date, code, description, round(CAST(probability AS DOUBLE), 3) AS probability
        FROM bertxml.predicted_codes ORDER BY note_id, probability DESC LIMIT 10"""),
    ("The newest AUC report per dataset",
     """SELECT dataset, n_notes, round(micro_auc, 3) AS micro_auc, round(macro_auc, 3) AS macro_auc,
               n_codes_scored, n_codes_skipped FROM bertxml.latest_auc ORDER BY dataset"""),
]


def print_examples(wh, examples) -> None:
    for title, query in examples:
        df = wh.spark.sql(query)
        print(f"\n-- {title}\n{' '.join(query.split())}\n")
        print(format_rows(df.columns, df.collect(), "table"))


def busiest_recent_night(wh) -> str:
    """The test-split date with the most notes: stands in for 'yesterday' on generated data."""
    row = wh.spark.sql("""SELECT note_date, count(*) AS n FROM bertxml.labeled_notes WHERE split = 'test'
                          GROUP BY note_date ORDER BY n DESC, note_date DESC LIMIT 1""").first()
    return str(row["note_date"])


def run_demo(wh) -> int:
    from bertxml.evaluate import run_evaluate
    from bertxml.retrain import run_retrain
    from bertxml.score import run_score

    cfg = wh.cfg
    log.info("demo 1/4: generating %d notes into %s", cfg.generate.notes, wh.workdir)
    run_generate(wh, cfg.generate)
    log.info("demo 2/4: retrain (ETL -> vocabulary -> chunks -> pretraining -> fine-tuning -> dev AUC)")
    model_dir = run_retrain(wh, cfg)
    night = busiest_recent_night(wh)
    log.info("demo 3/4: nightly scoring of %s with %s", night, model_dir.name)
    run_score(wh, cfg, date=night, model_dir=model_dir)
    log.info("demo 4/4: AUC report for the night of %s", night)
    run_evaluate(wh, cfg, date=night, model_dir=model_dir)
    print_examples(wh, EXAMPLE_SQL)
    print(f"\nmodel: {model_dir}\nwarehouse: {wh.workdir}")
    return 0
