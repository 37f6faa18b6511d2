"""Tests for bertxml/scoring/drift.py: the measures by hand, the training profile from real Delta tables, and the
nightly job writing bertxml.night_drift for a night like the training set (not flagged) and a night whose
notes shift (a new note type, much longer notes: flagged), rerun without duplicates.

Run: .venv/bin/python -m pytest -q tests/test_drift.py
"""
import datetime as dt
import json
import logging
import math

import numpy as np
import pytest

from bertxml.platform import tables as t
from bertxml.config import ConfigError
from bertxml.config_io import load_config
from bertxml.models.profile import (add_dev_reference, bin_counts, length_edges, load_profile, psi, training_profile,
                                    word_stats)
from bertxml.models.modeldir import DRIFT_PROFILE_FILE, write_json
from bertxml.scoring.predictors import make_predict_fn, read_model_info
from bertxml.scoring.score import run_score
from test_score import SENTENCES, make_model_dir, note, write_notes

TRAIN_DAY, NORMAL, SHIFTED = dt.date(2025, 2, 1), dt.date(2025, 3, 1), dt.date(2025, 3, 2)
TYPES = ("progress_note", "discharge_summary")


def text_of(i: int, repeat: int = 1) -> str:
    """Note i: 1 to 4 of the test sentences, in a cycle, so any 4 consecutive notes have the same lengths."""
    base = " ".join(SENTENCES[(i + k) % len(SENTENCES)] for k in range(1 + i % 4))
    return " ".join([base] * repeat)


def test_measures_by_hand():
    assert psi([1, 1], [1, 1]) == 0.0
    # (0.8 - 0.5) ln(0.8 / 0.5) + (0.2 - 0.5) ln(0.2 / 0.5)
    assert psi([5, 5], [8, 2]) == pytest.approx(0.3 * math.log(1.6) - 0.3 * math.log(0.4))
    assert psi([1, 0], [1, 1]) == pytest.approx(psi([1, 1e-4], [1, 1]), rel=1e-3)   # an empty bin: floored
    words = np.array([1, 2, 3, 4, 5, 6, 7, 8])
    edges = length_edges(words, 4)
    assert edges == [2.75, 4.5, 6.25] and bin_counts(words, edges).tolist() == [2, 2, 2, 2]


def test_word_stats_counts_words_and_unheld_words(tmp_path):
    folder = make_model_dir(tmp_path)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    words, oov = word_stats(tok, [SENTENCES[0], "zyxwvut qqqq " + SENTENCES[0], None])
    assert words[1] == words[0] + 2 and oov[1] >= oov[0] + 2 and words[2] == 0
    assert word_stats(tok, [SENTENCES[0]], char_cap=7)[0][0] == 1                 # "Patient" only


def test_drift_limits_are_validated():
    cfg = load_config(sets=["drift.code_psi_limit=0.4", "drift.min_notes=5"])
    assert cfg.drift.code_psi_limit == 0.4 and cfg.drift.min_notes == 5
    for bad in ("drift.code_psi_limit=-1", "drift.oov_share_limit=0", "drift.length_bins=1",
                "drift.min_notes=0", "drift.note_type_psi_limit=inf"):
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            load_config(sets=[bad])


def write_training_set(wh, n_train=40):
    """ehr.notes (the ETL's input, with note types) and labeled_notes' train split made from it."""
    rows = [note(f"t{i:02d}", TRAIN_DAY, text_of(i), patient=f"P{i}", note_type=TYPES[i % 2])
            for i in range(n_train)]
    write_notes(wh, rows)
    labeled = [(r[0], r[1], r[2], r[3], "train", r[7], ["I10"] if i % 4 == 0 else [], []) for i, r in enumerate(rows)]
    labeled.append(("d0", "PD", "ED", TRAIN_DAY, "dev", SENTENCES[0], ["I10"], []))
    version = wh.write(wh.spark.createDataFrame(labeled, t.LABELED_NOTES_SCHEMA), wh.name(t.LABELED_NOTES))
    return rows, version


def test_training_profile_and_the_nightly_drift_table(wh, cfg, tmp_path, caplog):
    rows, version = write_training_set(wh)
    folder = make_model_dir(tmp_path / "models")
    info = read_model_info(folder)
    etl_run = {"run_id": "etl-test", "inputs": {"notes": {"source": "ehr.notes", "version": 0}}}
    profile = training_profile(wh, cfg, tokenizer_file=str(folder / "tokenizer.json"),
                               labeled_notes_path=str(wh.path(wh.name(t.LABELED_NOTES))),
                               labeled_notes_version=version, codes=list(info.codes), etl_run=etl_run,
                               max_len=info.max_len)
    assert profile["train_notes"] == 40 and profile["note_types"] == {"discharge_summary": 20, "progress_note": 20}
    assert profile["codes"]["I10"]["train_rate"] == 0.25 and profile["codes"]["E11.9"]["train_rate"] == 0.0
    assert sum(profile["note_length"]["counts"]) == 40 and 0 <= profile["oov"]["share"] < 1
    # The dev reference: the model's own answers on notes like the training set's.
    dev_probs = make_predict_fn(folder, device="cpu", cpu_bf16=False)([r[7] for r in rows])
    profile = add_dev_reference(profile, list(info.codes), dev_probs, info.thresholds)
    assert profile["dev"]["notes"] == 40 and 0 <= profile["codes"]["I10"]["rate"] <= 1
    write_json(folder / DRIFT_PROFILE_FILE, profile)
    assert load_profile(folder)[0] == json.loads((folder / DRIFT_PROFILE_FILE).read_text())

    # A normal night: notes like the training set's. A shifted one: a new note type, notes 6x as long.
    normal = [note(f"a{i:02d}", NORMAL, text_of(i), patient=f"Q{i}", note_type=TYPES[i % 2]) for i in range(12)]
    shifted = [note(f"b{i:02d}", SHIFTED, text_of(i, repeat=6), patient=f"R{i}",
                    note_type="telehealth_transcript" if i % 4 else TYPES[0]) for i in range(12)]
    write_notes(wh, rows + normal + shifted)
    cfg.score.partitions = 1
    cfg.score.cpu_bf16 = "false"
    cfg.drift.min_notes = 10
    first = run_score(wh, cfg, date=NORMAL, model_dir=folder)
    second = run_score(wh, cfg, date=SHIFTED, model_dir=folder)
    assert first["drift_flagged_nights"] == [] and first["drift"][NORMAL.isoformat()]["flagged"] == []
    assert second["drift_flagged_nights"] == [SHIFTED.isoformat()]
    assert {"note_length", "note_type"} <= set(second["drift"][SHIFTED.isoformat()]["flagged"])

    table = wh.table(wh.name(t.NIGHT_DRIFT))
    got = {(r.note_date, r.kind, r.name): r for r in table.collect()}
    n_rows = table.count()
    summary = got[(SHIFTED, "night", "summary")]
    assert summary.flagged and summary.n_notes == 12 and "note_type" in summary.detail
    assert not got[(NORMAL, "night", "summary")].flagged and got[(NORMAL, "night", "summary")].value == 0
    assert got[(NORMAL, "input", "note_type")].drift < 0.25 and got[(NORMAL, "input", "note_length")].drift < 0.25
    new_type = got[(SHIFTED, "input", "note_type")]
    assert new_type.value == pytest.approx(9 / 12) and "telehealth_transcript" in new_type.detail
    assert got[(SHIFTED, "note_type", "telehealth_transcript")].baseline == 0.0
    assert got[(SHIFTED, "input", "note_length")].value > 5 * got[(SHIFTED, "input", "note_length")].baseline
    code = got[(NORMAL, "code", "I10")]
    assert code.train_rate == 0.25 and code.baseline == profile["codes"]["I10"]["rate"] and 0 <= code.value <= 1
    assert {k[1] for k in got} == {"night", "output", "input", "code", "note_type"}
    assert all(r.model_version == info.model_version for r in got.values())

    # The job's log names the flagged night and measures; no note text reaches the log.
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "drift on" in r.getMessage()]
    assert len(warnings) == 1 and SHIFTED.isoformat() in warnings[0] and "note_type" in warnings[0]
    logged = caplog.text.lower()
    assert "hypertension" not in logged and "metformin" not in logged

    # A rerun of a night replaces its rows: the same keys, no row twice.
    run_score(wh, cfg, date=SHIFTED, model_dir=folder)
    table = wh.table(wh.name(t.NIGHT_DRIFT))
    assert table.count() == n_rows == table.select("note_date", "model_version", "kind", "name").distinct().count()
    runs = [json.loads(r.counts) for r in wh.table(wh.name(t.JOB_RUNS)).filter("job = 'score'").collect()]
    assert sorted(len(c["drift_flagged_nights"]) for c in runs) == [0, 1, 1]
