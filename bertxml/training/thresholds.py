"""Per-code thresholds and operating points, tuned on dev for every model kind: the F1-best threshold of
each code (`tune_thresholds`), and the auto-accept and review cuts at a target precision and recall
(`operating_points`, the bands of `bertxml.models.modeldir`).
"""
from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger("bertxml.training.thresholds")


def tune_thresholds(probs: np.ndarray, labels: np.ndarray, default: float = 0.5) -> np.ndarray:
    """Per code, the probability threshold (predict code when p >= threshold) with the highest F1 on these
    notes; `default` for a code with no positive note. Returns (M,) float32."""
    out = np.full(labels.shape[1], default, dtype=np.float32)
    for j in np.flatnonzero(labels.sum(axis=0) > 0):
        order = np.argsort(-probs[:, j], kind="stable")
        scores, hits = probs[order, j], labels[order, j]
        tp = np.cumsum(hits)  # true positives when the top k+1 notes are predicted
        f1 = 2 * tp / (np.arange(1, len(scores) + 1) + hits.sum())
        f1[:-1][scores[:-1] == scores[1:]] = -1  # only cut between different scores
        out[j] = scores[int(np.argmax(f1))]
    return out


def _cut(scores: np.ndarray, tp: np.ndarray, k: int, positives: int) -> dict:
    """The operating point of predicting the top k+1 notes: threshold scores[k], precision and recall."""
    return {"threshold": float(scores[k]), "precision": float(tp[k] / (k + 1)), "recall": float(tp[k] / positives)}


def operating_points(probs: np.ndarray, labels: np.ndarray, codes: list[str], f1_thresholds: np.ndarray,
                     auto_precision: float = 0.9, review_recall: float = 0.9, min_support: int = 10) -> dict:
    """Per code, from dev probabilities (n, M) and labels (n, M): the operating points the review bands use.

    - "f1": the F1-max threshold (`tune_thresholds`), with the precision and recall it has on these notes;
    - "auto": the LOWEST threshold whose precision reaches auto_precision (the most recall at that
      precision); None when no cut reaches it;
    - "review": the HIGHEST threshold whose recall reaches review_recall (the fewest notes to read for it);
    - "support": the notes with the code.
    Thresholds are cut only between different scores, as in `tune_thresholds`. A code with fewer than
    min_support positive notes gets no "auto" and no "review" (too rare to estimate a band: every
    prediction of it goes to review, at its F1 threshold). Returns a JSON-ready dict:
    {"targets": {...}, "codes": {code: {"support", "f1", "auto", "review"}}}.
    """
    out = {}
    for j, code in enumerate(codes):
        positives = int(labels[:, j].sum())
        point = {"support": positives, "f1": None, "auto": None, "review": None}
        out[code] = point
        if positives == 0:
            continue
        hit = probs[:, j] >= np.float32(f1_thresholds[j])
        tp_f1 = int((hit & (labels[:, j] > 0)).sum())
        point["f1"] = {"threshold": float(f1_thresholds[j]), "precision": tp_f1 / max(int(hit.sum()), 1),
                       "recall": tp_f1 / positives}
        if positives < min_support:
            continue
        order = np.argsort(-probs[:, j], kind="stable")
        scores, hits = probs[order, j], labels[order, j] > 0
        tp = np.cumsum(hits)  # true positives when the top k+1 notes are predicted
        valid = np.ones(len(scores), dtype=bool)
        valid[:-1] = scores[:-1] != scores[1:]  # only cut between different scores
        k = np.arange(len(scores))
        precise = np.flatnonzero(valid & (tp >= auto_precision * (k + 1) - 1e-9))
        if len(precise):
            point["auto"] = _cut(scores, tp, int(precise[-1]), positives)
        enough = np.flatnonzero(valid & (tp >= review_recall * positives - 1e-9))
        point["review"] = _cut(scores, tp, int(enough[0]), positives)
    return {"targets": {"auto_precision": auto_precision, "review_recall": review_recall,
                        "min_support": min_support, "measured_on": "dev", "notes": int(labels.shape[0])},
            "codes": out}
