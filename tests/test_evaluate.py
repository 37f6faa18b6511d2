"""Tests for bertxml/evaluate.py: AUCs by hand on four notes, Spark's rank-sum AUCs against scikit-learn
(ties, skipped codes), and the job on a split and on coded nights of a tiny warehouse.

Run: .venv/bin/python -m pytest -q tests/test_evaluate.py
"""
import datetime as dt
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from bertxml import tables as t
from bertxml.evaluate import auc_by_code, auc_report_from_arrays, micro_auc, run_evaluate, top_k_indices
from bertxml.score import make_predict_fn
from test_score import CODES, SENTENCES, make_model_dir

D1, D2 = dt.date(2025, 3, 1), dt.date(2025, 3, 2)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("models"), thresholds={c: 0.5 for c in CODES})


# ---- pure metrics -------------------------------------------------------------------------------------------
def test_report_from_arrays_by_hand():
    # Four notes, three codes. Code 0: positives 0.9, 0.4; negatives 0.6, 0.1 -> pairs won: (0.9>0.6, 0.9>0.1,
    # 0.4>0.1) = 3 of 4 -> 0.75. Code 1: one positive 0.5 tied with one negative 0.5, above 0.2, 0.3 ->
    # (0.5 vs 0.5 = half, beats 0.2, 0.3) = 2.5 / 3. Code 2: no positive -> skipped.
    y = np.array([[1, 0, 0], [0, 1, 0], [1, 0, 0], [0, 0, 0]])
    p = np.array([[0.9, 0.5, 0.1], [0.6, 0.5, 0.2], [0.4, 0.2, 0.3], [0.1, 0.3, 0.4]], dtype=np.float32)
    report = auc_report_from_arrays(y, p, train_counts=[5000, 100, 100], low_freq_threshold=2000)
    assert report["code_auc"][0] == pytest.approx(0.75) and report["code_auc"][1] == pytest.approx(2.5 / 3)
    assert np.isnan(report["code_auc"][2])
    assert report["n_codes_scored"] == 2 and report["n_codes_skipped"] == 1 and report["n_codes_low_freq"] == 1
    assert report["macro_auc"] == pytest.approx((0.75 + 2.5 / 3) / 2)
    assert report["macro_auc_low_freq"] == pytest.approx(2.5 / 3)
    # At 0.5: code 0 predicts notes 0, 1 (tp 1, fp 1, fn 1); code 1 notes 0, 1 (tp 1, fp 1); code 2 none.
    assert report["micro_f1"] == pytest.approx(2 * 2 / (2 * 2 + 2 + 1))
    assert report["macro_f1"] == pytest.approx((0.5 + 2 / 3) / 2)
    # P@k with k > M uses all M codes: note 0 holds 1 of 3, note 1 1 of 3, note 2 1 of 3, note 3 0.
    assert report["p_at_5"] == pytest.approx(0.25) and report["n_notes"] == 4


def test_top_k_breaks_ties_towards_the_higher_index():
    assert top_k_indices(np.array([[0.5, 0.9, 0.5, 0.1]]), 3).tolist() == [[1, 2, 0]]


def test_spark_aucs_equal_sklearn_with_ties_and_skipped_codes(spark):
    rng = np.random.default_rng(3)
    n, m = 60, 6
    p = np.round(rng.random((n, m)), 1).astype(np.float32)          # one decimal: many ties
    y = (rng.random((n, m)) < 0.3).astype(int)
    y[:, 4] = 0                                                       # no positive: skipped
    y[:, 5] = 1                                                       # no negative: skipped
    y[:, 2] = (p[:, 2] > 0.5) | (rng.random(n) < 0.2)                 # informative, with ties at every value
    rows = [(f"c{j}", float(p[i, j]), int(y[i, j])) for i in range(n) for j in range(m)]
    df = spark.createDataFrame(rows, "code string, probability float, label int")

    got = {r.code: r for r in auc_by_code(df).collect()}
    for j in range(m):
        r = got[f"c{j}"]
        assert (r.n_pos, r.n_neg) == (y[:, j].sum(), n - y[:, j].sum())
        if j >= 4:
            assert r.auc is None
        else:
            assert r.auc == pytest.approx(roc_auc_score(y[:, j], p[:, j]), abs=1e-3)
    micro = micro_auc(df).first()
    assert micro.auc == pytest.approx(roc_auc_score(y.ravel(), p.ravel()), abs=1e-3)
    report = auc_report_from_arrays(y, p, train_counts=[10] * m)
    assert report["micro_auc"] == pytest.approx(micro.auc, abs=1e-9)
    assert report["n_codes_skipped"] == 2


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
