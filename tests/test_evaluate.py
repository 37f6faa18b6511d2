"""Tests for bertxml/reports/evaluate.py: Spark's micro AUC at extreme probabilities, and the job on a split and on
coded nights of a tiny warehouse.

Run: .venv/bin/python -m pytest -q tests/test_evaluate.py
"""
import datetime as dt
import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from bertxml.platform import tables as t
from bertxml.reports.evaluate import micro_auc, run_evaluate
from bertxml.metrics import auc_report_from_arrays
from bertxml.scoring.predictors import make_predict_fn
from test_score import CODES, SENTENCES, make_model_dir

D1, D2 = dt.date(2025, 3, 1), dt.date(2025, 3, 2)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("models"), thresholds={c: 0.5 for c in CODES})


# ---- Spark's AUCs (their match with bertxml.metrics, ties included: tests/test_metrics.py) --------------------
def test_micro_auc_over_extreme_probabilities(spark):
    # Values at 0, 1 and far out in the tails land in different logit buckets; ranks must still add up.
    p = np.array([0.0, 1e-30, 1e-9, 0.3, 0.3, 0.7, 1 - 1e-7, 1.0, 1.0, 1e-9], dtype=np.float32)
    y = np.array([0, 0, 1, 0, 1, 1, 0, 1, 0, 1])
    df = spark.createDataFrame([(float(a), int(b)) for a, b in zip(p, y)], "probability float, label int")
    assert micro_auc(df).first().auc == pytest.approx(roc_auc_score(y, p), abs=1e-9)


# ---- the job --------------------------------------------------------------------------------------------------
NOTES = [  # note_id, patient, encounter, date, text, codes
    ("t1", "P1", "E1", D1, SENTENCES[0] + " " + SENTENCES[6], ["I10"]),
    ("t2", "P2", "E2", D1, SENTENCES[1] + " " + SENTENCES[7], ["E11.9", "I10"]),
    ("t3", "P3", "E3", D1, SENTENCES[2] + " " + SENTENCES[4], ["J45.909", "R05.9"]),
    ("t4", "P4", "E4", D2, SENTENCES[3] + " " + SENTENCES[5], ["M54.5"]),
    ("t5", "P5", "E5", D2, " ".join(SENTENCES), ["I10", "E11.9", "R05.9"]),
    ("t6", "P6", "E6", D2, SENTENCES[4] + " " + SENTENCES[0], ["R05.9", "Z99.89"]),
]


def arrays_for(model_dir, notes):
    predict = make_predict_fn(model_dir, device="cpu")
    probs = predict([n[4] for n in notes])
    y = np.array([[int(c in n[5]) for c in CODES] for n in notes])
    return y, probs


def test_run_evaluate_on_a_split(wh, cfg, model_dir):
    rows = [(i, p, e, d, "test", text, codes, []) for i, p, e, d, text, codes in NOTES]
    wh.write(wh.spark.createDataFrame(rows, t.LABELED_NOTES_SCHEMA), wh.name(t.LABELED_NOTES))
    cfg.score.partitions = 1
    result = run_evaluate(wh, cfg, split="test", model_dir=model_dir)

    y, probs = arrays_for(model_dir, NOTES)
    expected = auc_report_from_arrays(y, probs, train_counts=[1000, 2000, 3000, 4000, 5000],
                                      low_freq_threshold=cfg.evaluate.low_freq_threshold,
                                      thresholds=[0.5] * len(CODES))
    report = wh.table(wh.name(t.AUC_REPORT)).collect()
    assert len(report) == 1 and report[0].dataset == "test" and report[0].model_version == "bertxml-test-a"
    for key in ("micro_auc", "macro_auc", "macro_auc_low_freq", "micro_f1", "macro_f1", "p_at_5", "p_at_8"):
        assert getattr(report[0], key) == pytest.approx(expected[key], abs=1e-3), key
    assert (report[0].n_notes, report[0].n_codes_scored, report[0].n_codes_low_freq) == (6, 5, 1)
    codes = {r.code: r for r in wh.table(wh.name(t.CODE_AUC)).collect()}
    assert set(codes) == set(CODES) and codes["I10"].n_pos == 3 and codes["I10"].train_count == 2000
    assert codes["I10"].auc == pytest.approx(expected["code_auc"][1], abs=1e-3)
    hist = Path(result["report_dir"]) / "code_auc_hist.png"
    assert hist.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((Path(result["report_dir"]) / "report.json").read_text())["dataset"] == "test"
    assert wh.spark.sql("SELECT dataset FROM bertxml.latest_auc").collect()[0].dataset == "test"

    # A rerun replaces the model version's rows of the dataset: as many rows as one run leaves.
    again = run_evaluate(wh, cfg, split="test", model_dir=model_dir)
    report = wh.table(wh.name(t.AUC_REPORT)).collect()
    assert len(report) == 1 and report[0].run_id == again["run_id"]
    assert report[0].micro_auc == pytest.approx(expected["micro_auc"], abs=1e-3)
    code_rows = wh.table(wh.name(t.CODE_AUC)).collect()
    assert len(code_rows) == len(CODES) and {r.run_id for r in code_rows} == {again["run_id"]}

    # The encounter level: t1 and t2 now share encounter E1, scored as the max of the two against the
    # union of their codes; its rows sit beside the note level's.
    rows = [(i, p, "E1" if i == "t2" else e, d, "test", text, codes, []) for i, p, e, d, text, codes in NOTES]
    wh.write(wh.spark.createDataFrame(rows, t.LABELED_NOTES_SCHEMA), wh.name(t.LABELED_NOTES))
    result = run_evaluate(wh, cfg, split="test", model_dir=model_dir, level="encounter")
    enc_probs = np.vstack([np.maximum(probs[0], probs[1]), probs[2:]])
    enc_y = np.vstack([np.maximum(y[0], y[1]), y[2:]])
    expected = auc_report_from_arrays(enc_y, enc_probs, train_counts=[1000, 2000, 3000, 4000, 5000],
                                      thresholds=[0.5] * len(CODES))
    report = {r.dataset: r for r in wh.table(wh.name(t.AUC_REPORT)).collect()}
    assert set(report) == {"test", "encounter:test"} and result["n_encounters"] == 5
    assert report["encounter:test"].n_notes == 5
    for key in ("micro_auc", "macro_auc", "micro_f1", "p_at_5"):
        assert getattr(report["encounter:test"], key) == pytest.approx(expected[key], abs=1e-3), key
    assert report["test"].run_id == again["run_id"]
    enc_codes = {r.code: r for r in wh.table(wh.name(t.CODE_AUC)).filter("dataset = 'encounter:test'").collect()}
    assert enc_codes["I10"].n_pos == 2 and wh.table(wh.name(t.CODE_AUC)).count() == 2 * len(CODES)


def test_run_evaluate_on_coded_nights(wh, cfg, model_dir):
    notes = [(i, p, e, d, "progress_note", "physician", "final", text) for i, p, e, d, text, _ in NOTES]
    notes.append(("uncoded", "P7", "E7", D2, "progress_note", "physician", "final", SENTENCES[1] + SENTENCES[2]))
    # P1 has I10 on two earlier encounters: chronic, so the ETL's rule imputes it on t1's encounter E1 too.
    diag = [(p, e, c, d) for _, p, e, d, _, codes in NOTES for c in codes if not (e == "E1")]
    diag += [("P1", "E0", "I10", dt.date(2025, 1, 5)), ("P1", "E00", "I10", dt.date(2025, 2, 5)),
             ("P1", "E1", "J45.909", D1)]
    wh.write(wh.spark.createDataFrame(notes, t.NOTES_SCHEMA), "ehr.notes")
    wh.write(wh.spark.createDataFrame(diag, t.DIAGNOSES_SCHEMA), "ehr.diagnoses")
    cfg.score.partitions = 1
    result = run_evaluate(wh, cfg, date_from="2025-03-01", date_to=dt.date(2025, 3, 2), model_dir=model_dir)

    rows = {r.dataset: r for r in wh.table(wh.name(t.AUC_REPORT)).collect()}
    assert set(rows) == {"dates:2025-03-01..2025-03-02", "date:2025-03-01", "date:2025-03-02"}
    assert rows["dates:2025-03-01..2025-03-02"].n_notes == 6 and rows["date:2025-03-01"].n_notes == 3
    assert result["notes_left_out_by_reason"] == {"no_diagnoses": 1}
    labelled = [n if n[0] != "t1" else (*n[:5], ["I10", "J45.909"]) for n in NOTES]  # t1: imputed I10
    y, probs = arrays_for(model_dir, labelled)
    expected = auc_report_from_arrays(y, probs, train_counts=[1000 * (i + 1) for i in range(5)])
    assert rows["dates:2025-03-01..2025-03-02"].micro_auc == pytest.approx(expected["micro_auc"], abs=1e-3)
    night1 = auc_report_from_arrays(y[:3], probs[:3], train_counts=[1000] * 5)
    assert rows["date:2025-03-01"].micro_auc == pytest.approx(night1["micro_auc"], abs=1e-3)
    assert rows["date:2025-03-01"].n_codes_skipped == night1["n_codes_skipped"]
    codes = {r.code: r for r in wh.table(wh.name(t.CODE_AUC)).collect()}
    assert codes["J45.909"].n_pos == 2 and {r.dataset for r in codes.values()} == {"dates:2025-03-01..2025-03-02"}
