"""The logistic regression baseline (paper §3.4.1): a sparse bag of the WordPieces of a note's first chunk
(special tokens left out), sublinear tf x idf with L2-normalised rows (or raw counts), and one L2 logistic
regression per code (scikit-learn's liblinear, one-vs-rest). The weights are coef (M, V), intercept (M,)
and idf (V,); prediction is sigmoid(x W^T + b) in NumPy (`LogRegPredictor`), no scikit-learn object kept.
"""
from __future__ import annotations

import logging
import math

import numpy as np
import safetensors.numpy
import scipy.sparse as sp
from sklearn.linear_model import LogisticRegression

from bertxml.models.baselines import BaselinePredictor
from bertxml.models.modeldir import WEIGHTS_FILE

log = logging.getLogger("bertxml.models.logreg")


def bag_of_words(token_ids: list[np.ndarray], vocab_size: int, skip_ids=()):
    """Token id arrays -> sparse counts (n, V) float32 (CSR); `skip_ids` (special tokens) are not counted."""
    skip = np.asarray(sorted(skip_ids), dtype=np.int64)
    rows, cols = [], []
    for i, ids in enumerate(token_ids):
        ids = np.asarray(ids, dtype=np.int64)
        ids = ids[(ids >= 0) & (ids < vocab_size) & ~np.isin(ids, skip)]
        rows.append(np.full(len(ids), i, dtype=np.int64))
        cols.append(ids)
    row = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
    col = np.concatenate(cols) if cols else np.zeros(0, dtype=np.int64)
    counts = sp.csr_matrix((np.ones(len(row), dtype=np.float32), (row, col)), shape=(len(token_ids), vocab_size))
    counts.sum_duplicates()
    return counts


def idf_weights(counts) -> np.ndarray:
    """Smoothed inverse document frequency (V,) of a counts matrix: log((1 + n) / (1 + df)) + 1."""
    n = counts.shape[0]
    df = np.bincount(counts.indices, minlength=counts.shape[1]).astype(np.float64)
    return (np.log((1.0 + n) / (1.0 + df)) + 1.0).astype(np.float32)


def weight_features(counts, idf: np.ndarray | None):
    """Counts -> the model's features: with idf, sublinear tf (1 + log tf) x idf and L2-normalised rows;
    without, the counts themselves."""
    if idf is None:
        return counts
    x = counts.copy()
    x.data = (1.0 + np.log(x.data)) * idf[x.indices]
    norms = np.sqrt(np.asarray(x.multiply(x).sum(axis=1)).ravel())
    norms[norms == 0] = 1.0
    x.data /= np.repeat(norms, np.diff(x.indptr)).astype(np.float32)
    return x.astype(np.float32)


def fit_one_vs_rest(x, labels: np.ndarray, c: float, max_iter: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """One L2 logistic regression per code (scikit-learn, liblinear) on features x (n, V) and labels (n, M).
    Returns coef (M, V) and intercept (M,) float32. A code with no positive (or no negative) note in x
    gets a constant: zero weights and the log-odds of its (smoothed) train frequency."""
    n, m = labels.shape
    coef = np.zeros((m, x.shape[1]), dtype=np.float32)
    intercept = np.zeros(m, dtype=np.float32)
    for j in range(m):
        y = labels[:, j] > 0
        positives = int(y.sum())
        if positives == 0 or positives == n:
            p = (positives + 0.5) / (n + 1.0)
            intercept[j] = math.log(p / (1 - p))
            continue
        clf = LogisticRegression(C=c, solver="liblinear", max_iter=max_iter, random_state=seed)
        clf.fit(x, y.astype(np.int64))
        coef[j], intercept[j] = clf.coef_[0], clf.intercept_[0]
    return coef, intercept


def logreg_probabilities(x, coef: np.ndarray, intercept: np.ndarray) -> np.ndarray:
    """sigmoid(x W^T + b): (n, V) sparse x, (M, V) W, (M,) b -> (n, M) float32."""
    logits = np.asarray(x @ coef.T, dtype=np.float32) + intercept[None, :]
    return (1.0 / (1.0 + np.exp(-np.clip(logits, -60, 60)))).astype(np.float32)


class LogRegPredictor(BaselinePredictor):
    def __init__(self, model_dir, device=None, batch_size: int = 16, num_threads=None, threshold_default=0.5):
        super().__init__(model_dir, device, batch_size, num_threads, threshold_default)
        weights = safetensors.numpy.load_file(str(self.info.model_dir / WEIGHTS_FILE))
        self.coef, self.intercept = weights["coef"], weights["intercept"]
        self.idf = weights.get("idf")
        self.skip = self.arch.get("skip_ids", [])

    def probabilities(self, chunks):
        x = weight_features(bag_of_words(chunks, self.coef.shape[1], self.skip), self.idf)
        return logreg_probabilities(x, self.coef, self.intercept)
