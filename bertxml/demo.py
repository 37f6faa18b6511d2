"""`bertxml demo` / `make demo`: the main job end to end on the embedded default.

generate a synthetic warehouse -> ETL -> example SQL an analyst would type, printed with its output.
"""
from __future__ import annotations

import logging

from bertxml.etl import run_etl
from bertxml.generate import run_generate
from bertxml.sql import format_rows

log = logging.getLogger("bertxml.demo")

EXAMPLE_SQL = [
    ("Notes per split, with imputed chronic codes",
     """SELECT split, count(*) AS notes, round(avg(size(codes)), 2) AS codes_per_note,
               sum(CASE WHEN size(imputed_codes) > 0 THEN 1 ELSE 0 END) AS notes_with_imputed
        FROM bertxml.labeled_notes GROUP BY split ORDER BY split"""),
    ("The ten most frequent codes in the label vocabulary",
     """SELECT label_index, code, description, train_count, is_chronic
        FROM bertxml.label_vocab ORDER BY train_count DESC LIMIT 10"""),
    ("Why rows were rejected",
     """SELECT source, reason, count(*) AS n FROM bertxml.rejects GROUP BY source, reason ORDER BY n DESC"""),
]


def print_examples(wh, examples) -> None:
    for title, query in examples:
        df = wh.spark.sql(query)
        print(f"\n-- {title}\n{' '.join(query.split())}\n")
        print(format_rows(df.columns, df.collect(), "table"))


def run_demo(wh) -> int:
    cfg = wh.cfg
    log.info("demo: generating %d notes into %s", cfg.generate.notes, wh.workdir)
    run_generate(wh, cfg.generate)
    run_etl(wh, cfg)
    print_examples(wh, EXAMPLE_SQL)
    return 0
