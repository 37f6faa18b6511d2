"""Tests for bertxml/metrics.py: AUCs, F1 and P@k by hand on four notes, and Spark's rank-sum AUCs
(bertxml.reports.evaluate) held to these within 1e-9, ties and skipped codes included.

Run: .venv/bin/python -m pytest -q tests/test_metrics.py
"""
import numpy as np
import pytest

from bertxml.reports.evaluate import auc_by_code, micro_auc
from bertxml.metrics import auc_metrics, auc_report_from_arrays, code_aucs, micro_f1, top_k_indices
from bertxml.metrics import micro_auc as np_micro_auc


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
    assert micro_f1(p, y, np.full(3, 0.5, dtype=np.float32)) == pytest.approx(report["micro_f1"])
    assert report["macro_f1"] == pytest.approx((0.5 + 2 / 3) / 2)
    # P@k with k > M uses all M codes: note 0 holds 1 of 3, note 1 1 of 3, note 2 1 of 3, note 3 0.
    assert report["p_at_5"] == pytest.approx(0.25) and report["n_notes"] == 4
    # Training's dev figures are the same numbers.
    dev = auc_metrics(p, y)
    assert dev["macro_auc"] == report["macro_auc"] and dev["micro_auc"] == report["micro_auc"]
    assert dev["codes_with_auc"] == 2 and dev["notes"] == 4


def test_undefined_aucs_are_none():
    y = np.zeros((3, 2), dtype=int)
    assert np_micro_auc(y, np.full((3, 2), 0.5)) is None
    assert auc_metrics(np.full((3, 2), 0.5), y) == {"micro_auc": None, "macro_auc": None, "codes_with_auc": 0,
                                                     "notes": 3}


def test_top_k_breaks_ties_towards_the_higher_index():
    assert top_k_indices(np.array([[0.5, 0.9, 0.5, 0.1]]), 3).tolist() == [[1, 2, 0]]


def test_spark_aucs_equal_the_numpy_ones_with_ties_and_skipped_codes(spark):
    rng = np.random.default_rng(3)
    n, m = 80, 7
    p = np.round(rng.random((n, m)), 1).astype(np.float32)          # one decimal: many ties, within and across codes
    y = (rng.random((n, m)) < 0.3).astype(int)
    y[:, 4] = 0                                                       # no positive: skipped
    y[:, 5] = 1                                                       # no negative: skipped
    y[:, 2] = (p[:, 2] > 0.5) | (rng.random(n) < 0.2)                 # informative, with ties at every value
    p[:, 6] = 0.5                                                     # one value for every note: AUC 0.5
    rows = [(f"c{j}", float(p[i, j]), int(y[i, j])) for i in range(n) for j in range(m)]
    df = spark.createDataFrame(rows, "code string, probability float, label int")

    expected = code_aucs(y, p)
    got = {r.code: r for r in auc_by_code(df).collect()}
    assert sorted(got) == [f"c{j}" for j in range(m)]
    for j in range(m):
        r = got[f"c{j}"]
        assert (r.n_pos, r.n_neg) == (y[:, j].sum(), n - y[:, j].sum())
        if np.isnan(expected[j]):
            assert j in (4, 5) and r.auc is None
        else:
            assert r.auc == pytest.approx(expected[j], abs=1e-9), j
    assert expected[6] == 0.5
    assert micro_auc(df).first().auc == pytest.approx(np_micro_auc(y, p), abs=1e-9)
    by_night = micro_auc(df.withColumn("night", (df.label * 0 + 1)), by=("night",)).first()
    assert by_night.auc == pytest.approx(np_micro_auc(y, p), abs=1e-9)
