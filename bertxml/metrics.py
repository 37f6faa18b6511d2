"""The evaluation metrics on numpy arrays: AUCs (micro, macro, per code), F1 at per-code thresholds, P@k.

The one place these are computed from arrays: training's dev AUC (`bertxml.training.train`,
`bertxml.training.baselines`), `bertxml compare` and the array form of the auc_report. The Spark job
(`bertxml.reports.evaluate`) computes the same AUCs by rank sums over a table too large to collect;
tests/test_metrics.py holds it to these within 1e-9, ties included.

Arrays: y (n, M) 0/1 labels of n notes and M codes, probs (n, M). A code's AUC needs a positive and a
negative note; the others are "skipped" (NaN per code, left out of the macro average). Ties get half a
pair (average ranks), as in scikit-learn's roc_auc_score, which does the counting.
"""
from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score

P_AT = (5, 8)
METRICS = ("micro_auc", "macro_auc", "macro_auc_low_freq", "n_codes_scored", "n_codes_skipped",
           "n_codes_low_freq", "n_notes", "micro_f1", "macro_f1", "p_at_5", "p_at_8")


def code_aucs(y, probs) -> np.ndarray:
    """(M,) the AUC of each code over the n notes, NaN for a code with no positive or no negative note."""
    y, probs = np.asarray(y), np.asarray(probs)
    n_pos = y.sum(axis=0)
    out = np.full(y.shape[1], np.nan)
    for j in np.flatnonzero((n_pos > 0) & (n_pos < y.shape[0])):
        out[j] = roc_auc_score(y[:, j], probs[:, j])
    return out


def micro_auc(y, probs) -> float | None:
    """The AUC over every (note, code) pair pooled; None without a positive and a negative pair."""
    flat = np.asarray(y).ravel()
    return float(roc_auc_score(flat, np.asarray(probs).ravel())) if 0 < flat.sum() < flat.size else None


def auc_metrics(probs: np.ndarray, labels: np.ndarray) -> dict:
    """Training's dev figures: micro AUC, macro AUC (mean over the codes with an AUC) and how many codes
    have one. None where undefined."""
    per_code = code_aucs(labels, probs)
    scored = ~np.isnan(per_code)
    return {"micro_auc": micro_auc(labels, probs),
            "macro_auc": float(per_code[scored].mean()) if scored.any() else None,
            "codes_with_auc": int(scored.sum()), "notes": int(labels.shape[0])}


def micro_f1(probs: np.ndarray, labels: np.ndarray, thresholds: np.ndarray) -> float:
    """F1 over every (note, code) pair, a code predicted when its probability is at least its threshold."""
    predicted = probs >= thresholds[None, :]
    tp = float((predicted & (labels > 0)).sum())
    denominator = float(predicted.sum() + labels.sum())
    return 2 * tp / denominator if denominator else 0.0


def summarize_codes(n_pos, n_neg, auc, tp, fp, train_counts, low_freq_threshold: int) -> dict:
    """Macro AUCs and F1s from per-code arrays (M,): positives, negatives, AUC (NaN when skipped), true and
    false positives at the code's threshold, train counts. Macro F1 averages the codes with a positive.
    Shared by the Spark job (per-code counts from Spark) and `auc_report_from_arrays`."""
    n_pos, n_neg = np.asarray(n_pos, dtype=np.float64), np.asarray(n_neg, dtype=np.float64)
    auc, tp, fp = (np.asarray(a, dtype=np.float64) for a in (auc, tp, fp))
    scored = (n_pos > 0) & (n_neg > 0)
    low = scored & (np.asarray(train_counts, dtype=np.float64) < low_freq_threshold)
    fn = n_pos - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(n_pos > 0, 2 * tp / (2 * tp + fp + fn), np.nan)
    denom = 2 * tp.sum() + fp.sum() + fn.sum()
    return {
        "macro_auc": float(auc[scored].mean()) if scored.any() else None,
        "macro_auc_low_freq": float(auc[low].mean()) if low.any() else None,
        "n_codes_scored": int(scored.sum()),
        "n_codes_skipped": int((~scored).sum()),
        "n_codes_low_freq": int(low.sum()),
        "micro_f1": float(2 * tp.sum() / denom) if denom else None,
        "macro_f1": float(np.nanmean(f1)) if (n_pos > 0).any() else None,
    }


def top_k_indices(probs: np.ndarray, k: int) -> np.ndarray:
    """(n, k) column indices of each row's k highest probabilities; ties go to the higher index (as Spark's
    sort_array over (probability, index) structs, descending)."""
    m = probs.shape[1]
    order = np.argsort(-probs[:, ::-1], axis=1, kind="stable")[:, :min(k, m)]
    return m - 1 - order


def auc_report_from_arrays(y_true, probs, train_counts, low_freq_threshold: int = 2000,
                           thresholds=None) -> dict:
    """The auc_report metrics (METRICS) from arrays: y_true (n, M) 0/1, probs (n, M), train_counts (M,),
    thresholds (M,) per code (default 0.5). Adds "code_auc": (M,) per-code AUCs, NaN when skipped."""
    y = np.asarray(y_true).astype(np.int64)
    p = np.asarray(probs, dtype=np.float32)
    n, m = y.shape
    thr = np.full(m, 0.5, dtype=np.float32) if thresholds is None else np.asarray(thresholds, dtype=np.float32)
    n_pos = y.sum(axis=0)
    code_auc = code_aucs(y, p)
    hit = p >= thr[None, :]
    out = summarize_codes(n_pos, n - n_pos, code_auc, (hit & (y == 1)).sum(axis=0), (hit & (y == 0)).sum(axis=0),
                          train_counts, low_freq_threshold)
    out["micro_auc"] = micro_auc(y, p)
    out["n_notes"] = int(n)
    for k in P_AT:
        top = top_k_indices(p, k)
        out[f"p_at_{k}"] = float(np.take_along_axis(y, top, axis=1).sum(axis=1).mean() / top.shape[1]) if n else None
    out["code_auc"] = code_auc
    return {key: out[key] for key in (*METRICS, "code_auc")}


def fmt_metric(value, digits: int = 4) -> str:
    """A metric for a log line or a report: 'n/a' when there is none (e.g. no dev code with a positive note)."""
    return "n/a" if value is None or value != value else f"{value:.{digits}f}"  # value != value: NaN
