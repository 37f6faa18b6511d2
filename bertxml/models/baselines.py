"""The paper's baselines (§3.4, §4.3): logistic regression on a bag of WordPieces, and a bidirectional GRU with
multi-head attention (eq. 5-8) over frozen StarSpace embeddings. Each is a model folder that `bertxml score`
and `bertxml evaluate` use exactly like a BERT one.

    bertxml train --model logreg|bilstm [--out DIR]        # one baseline, into WORKDIR/models
    bertxml compare                                        # the baselines beside the BERT rows

Inputs are pinned as `bertxml.training.inputs.resolve_train_inputs` pins them: the same Delta versions of
labeled_notes, label_vocab and chunks, the same label vocabulary and tokenizer, so a baseline and a BERT
model trained together see the same notes, labels and splits. Every baseline reads a note's FIRST
`baseline.max_len` tokens (paper §4.3: "All baseline models use a max input length of 512 tokens"): chunk 0
of `bertxml.chunks`, and at scoring time the first chunk of the same chunking (`bertxml.text.tokenize`), so a
longer note is scored on its start and flagged `truncated`.

- logreg (§3.4.1): sparse bag of WordPiece ids of the first chunk (special tokens left out), sublinear
  tf x idf with L2-normalised rows (or raw counts), and one L2 logistic regression per code
  (scikit-learn's liblinear: one-vs-rest over the label vocabulary). A train split larger than
  `baseline.logreg_max_train_notes` is fit on a seeded uniform sample of that many notes (only the sample's
  chunks are read); the manifest records the sample. Weights: coef (M, V), intercept (M,), idf (V,) as
  safetensors; prediction is sigmoid(x W^T + b) in NumPy, no scikit-learn object is kept (no pickle).
- bilstm (§3.4.2, §4.3): input embeddings trained first on the train notes with their codes as labels in
  the StarSpace manner (TagSpace mode: a note's mean WordPiece embedding against its codes' embeddings,
  dot similarity, softmax loss), then frozen; dropout 0.1 on them; one bidirectional GRU layer; K heads
  with learned queries q_k, a_ik = softmax_i <h_i, q_k> over the non-padding tokens (eq. 5), per-head
  context c_k = sum_i a_ik h_i / sqrt(d_h) (eq. 6, d_h = 2 x hidden: h_i concatenates both directions),
  c = [c_0 .. c_K] (eq. 7), y = sigmoid(W_a c + b) (eq. 8; the bias starts at each code's train
  log-odds). Binary cross-entropy, AdamW, the best dev macro AUC epoch kept.

Both tune per-code thresholds on dev for maximum F1 (`bertxml.training.thresholds.tune_thresholds`) and write
model.safetensors + model_config.json, tokenizer.json, label_vocab.json, thresholds.json and manifest.json
(`bertxml.models.modeldir.write_model_dir`; model_kind "logreg" | "bilstm").

This module holds what the two share: the folder's file names, the first-chunk rule (`first_chunks`) and
the predictor base (`BaselinePredictor`). The models are `bertxml.models.logreg`, `bertxml.models.bigru` and
`bertxml.models.starspace`; their training is `bertxml.training.baselines`; `bertxml.scoring.predictors`
registers their predictors for scoring.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from bertxml.models import modeldir
from bertxml.models.modeldir import CONFIG_FILE
from bertxml.text.tokenize import encode_notes
from bertxml.text.vocab import load_tokenizer

log = logging.getLogger("bertxml.models.baselines")

KINDS = ("logreg", "bilstm")


def first_chunks(tokenizer, texts: list, max_len: int) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """Texts -> (the first chunk `[CLS] piece [SEP]` of each, as int64 arrays; word pieces per note (of the
    text read); truncated: the note is longer than its first chunk). The scorer's chunking
    (`bertxml.text.tokenize.encode_notes`, as bertxml.chunks), so training and scoring see the same tokens."""
    notes, n_tokens, truncated = encode_notes(tokenizer, texts, max_len, max_chunks=1)
    return [np.asarray(chunks[0], dtype=np.int64) for chunks in notes], n_tokens, truncated


# ---------------------------------------------------------------------------------------------------------
# Scoring: the base of the predictors `bertxml.scoring.predictors` dispatches to for "logreg" and "bilstm"


class BaselinePredictor:
    """A baseline model folder as `predict(texts) -> (n, M) float32`, plus `.score(texts) -> ScoredNotes`
    (one chunk a note; truncated when the note is longer than its first chunk) and `.info` (ModelInfo)."""

    def __init__(self, model_dir: str | Path, device: str | None = None, batch_size: int = 16,
                 num_threads: int | None = None, threshold_default: float = 0.5):
        self.info = modeldir.read_model_info(model_dir, threshold_default)  # baseline_predictor checked the kind
        if num_threads:
            torch.set_num_threads(int(num_threads))
        self.tokenizer = load_tokenizer(self.info.model_dir)
        self.max_len = self.info.max_len
        self.batch_size = max(1, int(batch_size))
        self.arch = json.loads((self.info.model_dir / CONFIG_FILE).read_text())

    def probabilities(self, chunks: list[np.ndarray]) -> np.ndarray:
        raise NotImplementedError

    def score(self, texts):
        texts = list(texts.tolist() if isinstance(texts, np.ndarray) else texts)
        chunks, n_tokens, truncated = first_chunks(self.tokenizer, texts, self.max_len)
        probs = self.probabilities(chunks) if chunks else np.zeros((0, self.info.n_labels), dtype=np.float32)
        return modeldir.ScoredNotes(probs=probs, n_chunks=np.ones(len(texts), dtype=np.int64), n_tokens=n_tokens,
                           truncated=truncated)

    def __call__(self, texts) -> np.ndarray:
        return self.score(texts).probs
