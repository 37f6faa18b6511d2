"""`bertxml demo`'s data: the nights it scores are full enough for their AUC report to mean something.

The demo itself trains a model (minutes); this runs its warehouse steps on its own config
(`conf/local.yaml`): the generation with the paused nights landing late, the ETL as of the history's commits,
and the nights labelled as `bertxml evaluate --from --to` labels them.
"""
from collections import defaultdict
from pathlib import Path

from pyspark.sql import functions as F

from bertxml.config_io import load_config
from bertxml.demo import CATCH_UP_NIGHTS, catch_up_nights, history_landed_at
from bertxml.etl.etl import run_etl
from bertxml.reports.evaluate import labeled_for_dates
from bertxml.etl.span import last_date
from bertxml.etl.generate import run_generate
from bertxml.platform.runs import job_run

LOCAL = Path(__file__).resolve().parents[1] / "conf" / "local.yaml"


def test_catch_up_nights_are_the_warehouse_last_weekdays():
    nights = catch_up_nights()
    assert len(nights) == CATCH_UP_NIGHTS and nights[-1] == last_date()
    assert [(b - a).days for a, b in zip(nights, nights[1:])] == [1] * (CATCH_UP_NIGHTS - 1)
    assert all(n.weekday() < 5 for n in nights)


def test_demo_nights_hold_dozens_of_notes_and_scoreable_codes(wh, cfg):
    local = load_config([str(LOCAL)])
    cfg.generate, cfg.etl = local.generate, local.etl          # wh.cfg is cfg
    nights = catch_up_nights()
    landed_at = history_landed_at(wh, run_generate(wh, cfg.generate, land_from=nights[0]))
    run_etl(wh, cfg, as_of_timestamp=landed_at)

    # the model trains on the history only: no note of the scored nights in labeled_notes
    history = wh.table("bertxml.labeled_notes")
    assert history.count() > 1000
    assert history.filter(F.col("note_date") >= F.lit(nights[0])).count() == 0
    vocab = {r.code for r in wh.table("bertxml.label_vocab").select("code").collect()}

    with job_run(wh, "test-demo-nights") as run:
        labeled = labeled_for_dates(wh, cfg, nights[0], nights[-1], run).select(
            "note_id", "note_date", "codes").collect()
    by_night, encounters = defaultdict(list), defaultdict(set)
    for row in labeled:
        by_night[row.note_date].append(set(row.codes) & vocab)
        encounters[row.note_date].add(row.note_id[:10])        # N + patient + encounter number
    assert sorted(by_night) == nights
    for night, notes in by_night.items():
        # evaluate's n_codes_scored: codes of the model's vocabulary with a positive and a negative note
        positives = defaultdict(int)
        for codes in notes:
            for code in codes:
                positives[code] += 1
        scoreable = [c for c, n in positives.items() if n < len(notes)]
        assert len(notes) >= 30, f"{night}: {len(notes)} labelled notes"
        assert len(encounters[night]) >= 15, f"{night}: {len(encounters[night])} encounters"
        assert len(scoreable) > 10, f"{night}: {len(scoreable)} scoreable codes"
