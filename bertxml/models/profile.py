"""The drift reference a model folder carries (`drift_profile.json`): written at training from the train
notes (`training_profile`) and the model's answers on dev (`add_dev_reference`), read by the nightly drift
job (`bertxml.scoring.drift`). Also the measures both sides share: word statistics, PSI and its noise
floor, length bins.
"""
from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
from scipy.stats import chi2
from tokenizers import Tokenizer

from bertxml.models.modeldir import DRIFT_PROFILE_FILE
from bertxml.platform.deltaread import read_delta, table_path
from bertxml.platform.warehouse import parse_source

log = logging.getLogger("bertxml.models.profile")


PROFILE_VERSION = 1
EPS = 1e-4                    # share floor in a PSI term: a bin empty on one side adds a large, finite term
NOISE_QUANTILE = 0.999        # a PSI limit is at least what sampling noise passes once in 1,000 nights
CHARS_PER_WORD_CAP = 64       # text cut at max_chunks * max_len * this many characters, as scoring cuts it


# ---- measures --------------------------------------------------------------------------------------------
def word_stats(tokenizer, texts: list, char_cap: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per text: (words, words the vocabulary does not hold whole), int64 arrays.

    A word is a pre-tokenised word after the tokenizer's own normalisation; it is out of vocabulary when
    WordPiece splits it into pieces or maps it to [UNK] (the definition of `bertxml.text.oov.oov_words`).
    """
    unk = tokenizer.token_to_id("[UNK]")
    cut = [(str(x) if x is not None else "")[:char_cap] if char_cap else (str(x) if x is not None else "")
           for x in texts]
    words, oov = np.zeros(len(cut), dtype=np.int64), np.zeros(len(cut), dtype=np.int64)
    for i, enc in enumerate(tokenizer.encode_batch(cut, add_special_tokens=False)):
        pieces: dict[int, list[int]] = {}
        for word, token_id in zip(enc.word_ids, enc.ids):
            if word is not None:
                pieces.setdefault(word, []).append(token_id)
        words[i] = len(pieces)
        oov[i] = sum(1 for ids in pieces.values() if len(ids) > 1 or ids[0] == unk)
    return words, oov


def psi(expected, actual, eps: float = EPS) -> float:
    """Population stability index sum((a - e) * ln(a / e)) of two distributions over the same bins (counts
    or shares; each is normalised, then floored at eps). 0: the same; > 0.25 is the usual 'shifted'."""
    return float(psi_terms(expected, actual, eps).sum())


def psi_terms(expected, actual, eps: float = EPS) -> np.ndarray:
    e, a = np.asarray(expected, dtype=np.float64), np.asarray(actual, dtype=np.float64)
    e = np.maximum(e / e.sum() if e.sum() > 0 else e, eps)
    a = np.maximum(a / a.sum() if a.sum() > 0 else a, eps)
    return (a - e) * np.log(a / e)


def noise_psi(bins: int, n_notes: int, quantile: float = NOISE_QUANTILE) -> float:
    """The PSI that sampling alone passes once in 1 / (1 - quantile) nights of n_notes notes drawn from the
    training distribution over `bins` bins: n * PSI is about chi-square with bins - 1 degrees of freedom
    (PSI is the symmetric chi-square divergence for small differences). A PSI limit is raised to this, so
    a small night is flagged only for a shift its notes can show."""
    return float(chi2.ppf(quantile, max(1, bins - 1)) / max(1, n_notes))


def length_edges(words: np.ndarray, bins: int) -> list[float]:
    """Inner edges of `bins` quantile bins of words per note (fewer when the quantiles tie)."""
    if len(words) == 0:
        return []
    qs = np.quantile(words.astype(np.float64), [k / bins for k in range(1, bins)])
    return sorted({float(q) for q in qs})


def bin_counts(words: np.ndarray, edges: list[float]) -> np.ndarray:
    """Notes per length bin: bin k holds edges[k-1] < words <= edges[k]."""
    return np.bincount(np.searchsorted(np.asarray(edges), words, side="left"), minlength=len(edges) + 1)


def _hash_order(note_id: str) -> str:
    return hashlib.sha256(note_id.encode("utf-8")).hexdigest()


# ---- training: the reference -----------------------------------------------------------------------------
def _notes_source_path(source, cfg, spec: str) -> str | None:
    """The Delta folder of the notes SOURCE an ETL run read (a table name or delta:PATH), else None."""
    fmt, where = parse_source(spec)
    if fmt == "delta":
        return where
    if fmt != "table":
        return None
    if hasattr(source, "spark"):
        if source.path_mode:
            return str(source.path(where))
        return source.spark.sql(f"DESCRIBE DETAIL {where}").first()["location"]
    schema, _, table = where.rpartition(".")
    return str(table_path(source, schema or "default", table)) if cfg.warehouse.catalog == "path" else None


def training_profile(source, cfg, *, tokenizer_file: str, labeled_notes_path: str, labeled_notes_version: int,
                     codes: list[str], etl_run: dict | None, max_len: int) -> dict:
    """The training set's input statistics and code shares, from labeled_notes' train split at the version
    trained on (read without Spark, `bertxml.platform.deltaread`). Lengths and OOV words are measured on up to
    `drift.profile_notes` train notes (the first by a hash of note_id: the same notes on every run); notes
    per note type on every train note, joined to the notes source at the version the ETL run read (None,
    with the reason, when that run or source is unknown). The dev reference is added by `add_dev_reference`.
    """
    dc = cfg.drift
    train = read_delta(labeled_notes_path, labeled_notes_version, columns=["note_id", "codes"],
                       filter={"split": ["train"]})
    ids = train["note_id"].to_pylist()
    per_code = Counter(c for codes_of in train["codes"].to_pylist() for c in set(codes_of or []))
    n_train = len(ids)
    sample = sorted(ids, key=_hash_order)[:dc.profile_notes] if n_train > dc.profile_notes else None
    text_filter = pc.field("note_id").isin(sample) if sample is not None else {"split": ["train"]}
    texts = read_delta(labeled_notes_path, labeled_notes_version, columns=["note_id", "text"],
                       filter=text_filter)["text"].to_pylist()
    char_cap = cfg.score.max_chunks_per_note * max_len * CHARS_PER_WORD_CAP
    words, oov = word_stats(Tokenizer.from_file(str(tokenizer_file)), texts, char_cap)
    edges = length_edges(words, dc.length_bins)

    note_types, note_types_reason = None, None
    notes_read = ((etl_run or {}).get("inputs") or {}).get("notes") or {}
    if not notes_read.get("source") or notes_read.get("version") is None:
        note_types_reason = "the ETL run that wrote the training set, or the Delta version of its notes, is unknown"
    else:
        try:
            path = _notes_source_path(source, cfg, notes_read["source"])
            if path is None:
                note_types_reason = f"the notes source {notes_read['source']} is not a Delta table"
            else:
                typed = read_delta(path, int(notes_read["version"]), columns=["note_id", "note_type"])
                train_ids = set(ids)
                note_types = dict(sorted(Counter(
                    nt if nt is not None else "(none)" for nid, nt in zip(typed["note_id"].to_pylist(),
                                                                          typed["note_type"].to_pylist())
                    if nid in train_ids).items()))
        except Exception as exc:  # noqa: BLE001 - a profile without note types beats no model
            note_types_reason = f"could not read {notes_read['source']} version {notes_read['version']}: {exc}"
    if note_types_reason:
        log.warning("drift profile: no notes per note type (%s)", note_types_reason)
    log.info("drift profile: %d train notes (%d measured), median %.0f words, OOV share %.4f, %s note types",
             n_train, len(texts), float(np.median(words)) if len(words) else 0.0,
             float(oov.sum() / max(1, words.sum())), len(note_types) if note_types is not None else "no")
    return {
        "profile_version": PROFILE_VERSION,
        "train_notes": n_train,
        "measured_notes": len(texts),
        "note_length": {"unit": "words", "edges": edges, "counts": bin_counts(words, edges).tolist(),
                        "median": float(np.median(words)) if len(words) else None,
                        "mean": float(words.mean()) if len(words) else None},
        "oov": {"words": int(words.sum()), "oov_words": int(oov.sum()),
                "share": float(oov.sum() / words.sum()) if words.sum() else None},
        "note_types": note_types,
        "note_types_reason": note_types_reason,
        "codes": {code: {"train_rate": per_code.get(code, 0) / n_train if n_train else None} for code in codes},
        "dev": None,
    }


def add_dev_reference(profile: dict | None, codes: list[str], dev_probs: np.ndarray | None,
                      thresholds: np.ndarray) -> dict | None:
    """The profile with the model's own answers on dev: per code its predicted positive rate at its threshold
    and its mean probability, and the predicted codes per note. dev_probs (n, M) note probabilities."""
    if profile is None:
        return None
    out = dict(profile, codes={c: dict(v) for c, v in profile["codes"].items()})
    if dev_probs is None or len(dev_probs) == 0:
        out["dev"] = None
        return out
    predicted = dev_probs >= np.asarray(thresholds)[None, :]
    rates, means = predicted.mean(axis=0), dev_probs.mean(axis=0)
    for j, code in enumerate(codes):
        out["codes"].setdefault(code, {}).update(rate=float(rates[j]), mean_probability=float(means[j]))
    out["dev"] = {"notes": int(len(dev_probs)), "codes_per_note": float(predicted.sum(axis=1).mean())}
    return out


def load_profile(model_dir: str | Path) -> tuple[dict | None, str | None]:
    """(drift_profile.json of a model folder, None) or (None, why there is none)."""
    path = Path(model_dir) / DRIFT_PROFILE_FILE
    if not path.exists():
        return None, f"{model_dir} has no {DRIFT_PROFILE_FILE} (trained before drift profiles were recorded)"
    try:
        profile = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        return None, f"{path} is not valid JSON: {exc}"
    if profile.get("profile_version") != PROFILE_VERSION:
        return None, f"{path} has profile_version {profile.get('profile_version')!r}, not {PROFILE_VERSION}"
    return profile, None
