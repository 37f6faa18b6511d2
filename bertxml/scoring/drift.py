"""Drift before the labels arrive: each scored night against the training set, in `bertxml.night_drift`.

Diagnoses are coded days or weeks after a note, so a model's AUC on a night is known late. What can be
measured the night itself is whether the notes, and the model's answers, still look like the training set:

- training records the reference into the model folder (`drift_profile.json`, `training_profile` and
  `add_dev_reference`): the train notes' length distribution (words per note, in `drift.length_bins`
  quantile bins), the share of their words the vocabulary does not hold whole, their notes per note type,
  each code's share of train notes, and the model's own answers on dev (each code's predicted positive
  rate at its threshold and its mean probability);
- the nightly job (`run_night_drift`, called by `bertxml.scoring.score.run_score` once the night's predictions are
  written) measures the same on the night's scored notes and writes one row per measure, in one Delta
  transaction that replaces this model version's rows of those nights (a rerun leaves one clean run).
  The measuring is one Spark job (`night_stats`): each prediction row meets its note, workers sum their
  partition per night, and only those sums reach the driver.

Rows (`bertxml.platform.tables.NIGHT_DRIFT_SCHEMA`), keyed by (note_date, model_version, kind, name):

    kind       name            value (the night)           baseline (training)      drift (vs the limit)
    night      summary         measures flagged            -                        -
    output     code_psi        -                           -                        PSI of the code mix
    output     codes_per_note  predicted codes per note    the same on dev          value - baseline
    output     codes_shifted   code rows flagged           -                        -
    input      note_length     median words per note       the same in train        PSI over length bins
    input      oov_share       share of words not held     the same in train        value - baseline
    input      note_type       share of notes of new types -                        PSI of notes per type
    code       <code>          predicted positive rate     the same on dev          value - baseline
    note_type  <type>          share of the night's notes  share of train notes     the type's PSI term

`train_rate` (code rows) is the code's share of train notes. A night is flagged when code_psi, note_length,
note_type or oov_share passes its limit (`DriftConfig`; for note_length and note_type at least the PSI that
sampling noise passes once in 1,000 nights of that size, `noise_psi`) and it has at least `drift.min_notes`
scored notes;
the job logs a warning and counts it in `bertxml.job_runs` (`drift`, `drift_flagged_nights`). A model folder
trained before profiles were recorded has no `drift_profile.json`: the night is skipped, with the reason
logged and counted. Note text never leaves the tokenizer: only counts are kept.
"""
from __future__ import annotations

import datetime as dt
import logging
import math
import time
from collections import Counter

import numpy as np
import pandas as pd
from pyspark.sql import functions as F
from pyspark.sql import types as T
from tokenizers import Tokenizer

from bertxml.models.profile import CHARS_PER_WORD_CAP, bin_counts, load_profile, noise_psi, psi, psi_terms, word_stats
from bertxml.platform import tables as t
from bertxml.platform.warehouse import local_frame, sql_string

log = logging.getLogger("bertxml.scoring.drift")


# ---- the night -------------------------------------------------------------------------------------------
_TOKENIZERS: dict = {}

NIGHT_STATS_SCHEMA = T.StructType([
    T.StructField("note_date", T.DateType()),
    T.StructField("notes", T.LongType()),               # prediction rows
    T.StructField("predicted", T.LongType()),           # predicted codes, summed over the rows
    T.StructField("positives", T.ArrayType(T.LongType())),            # per code index: rows predicting it
    T.StructField("probability_sums", T.ArrayType(T.DoubleType())),   # per code index: summed probability
    T.StructField("measured", T.LongType()),            # rows whose note text was measured
    T.StructField("words", T.LongType()),
    T.StructField("oov_words", T.LongType()),
    T.StructField("lengths", T.ArrayType(T.LongType())),         # distinct words-per-note values ...
    T.StructField("length_notes", T.ArrayType(T.LongType())),    # ... and the notes with each
    T.StructField("note_types", T.ArrayType(T.StringType())),    # note types ('(none)' for null) ...
    T.StructField("type_notes", T.ArrayType(T.LongType())),      # ... and the notes of each
])


def _tokenizer(tokenizer_file: str):
    tokenizer = _TOKENIZERS.get(tokenizer_file)
    if tokenizer is None:
        tokenizer = _TOKENIZERS[tokenizer_file] = Tokenizer.from_file(tokenizer_file)
    return tokenizer


def _night_stats_frames(frames, codes: tuple, tokenizer_file: str, char_cap: int):
    """mapInPandas body: prediction rows (note_date, probabilities, predicted_codes) joined to their note
    (note_type, text, _has_note: null when the row has no note) -> one NIGHT_STATS_SCHEMA row per night
    present in the frames, the partial sums of the partition. Only counts leave: no text, no per-note row."""
    index = {c: j for j, c in enumerate(codes)}
    tokenizer = _tokenizer(tokenizer_file)
    parts: dict = {}
    for frame in frames:
        if len(frame) == 0:
            continue
        for day, rows in frame.groupby("note_date", sort=False):
            acc = parts.get(day)
            if acc is None:
                acc = parts[day] = {"notes": 0, "predicted": 0, "positives": np.zeros(len(codes), np.int64),
                                    "probability_sums": np.zeros(len(codes)), "measured": 0, "words": 0,
                                    "oov_words": 0, "lengths": Counter(), "note_types": Counter()}
            acc["notes"] += len(rows)
            for predicted in rows["predicted_codes"]:
                if predicted is None:
                    continue
                acc["predicted"] += len(predicted)
                for code in predicted:
                    j = index.get(code)
                    if j is not None:
                        acc["positives"][j] += 1
            probs = [np.asarray(p, dtype=np.float64) for p in rows["probabilities"] if p is not None]
            if probs:
                acc["probability_sums"][:] += np.stack(probs)[:, :len(codes)].sum(axis=0)
            has = rows["_has_note"].notna().to_numpy()
            if has.any():
                noted = rows[has]
                words, oov = word_stats(tokenizer, noted["text"].tolist(), char_cap)
                acc["measured"] += int(has.sum())
                acc["words"] += int(words.sum())
                acc["oov_words"] += int(oov.sum())
                acc["lengths"].update(words.tolist())
                acc["note_types"].update(nt if isinstance(nt, str) else "(none)" for nt in noted["note_type"])
    for day, acc in parts.items():
        lengths, types = sorted(acc["lengths"].items()), sorted(acc["note_types"].items())
        yield pd.DataFrame([{
            "note_date": day, "notes": acc["notes"], "predicted": acc["predicted"],
            "positives": acc["positives"], "probability_sums": acc["probability_sums"],
            "measured": acc["measured"], "words": acc["words"], "oov_words": acc["oov_words"],
            "lengths": [k for k, _ in lengths], "length_notes": [v for _, v in lengths],
            "note_types": [k for k, _ in types], "type_notes": [v for _, v in types]}])


def night_stats(preds, notes, codes: tuple, tokenizer_file: str, char_cap: int) -> tuple[dict, dict]:
    """(output, inputs) of the nights' prediction rows `preds` (note_id, note_date, probabilities,
    predicted_codes) and the notes given to the model `notes` (note_id, note_date, note_type, text), in ONE
    Spark job: each prediction row meets its note, a worker sums its partition per night (the notes' words
    and out-of-vocabulary words counted by the model's tokenizer as training counted them) and the driver
    adds the partitions' rows.
    output: {night: {"notes", "predicted", "positives" (M,), "probability_sums" (M,)}};
    inputs: {night: {"notes", "words", "oov_words", "lengths" {words: notes}, "note_types" {type: notes}}},
    over the prediction rows that have their note (all of them, in the nightly job)."""
    noted = notes.select("note_id", "note_date", "note_type", "text", F.lit(True).alias("_has_note"))
    joined = (preds.select("note_id", "note_date", "probabilities", "predicted_codes")
              .join(noted, ["note_id", "note_date"], "left")
              .select("note_date", "probabilities", "predicted_codes", "note_type", "text", "_has_note"))
    path = str(tokenizer_file)
    parts = joined.mapInPandas(lambda frames: _night_stats_frames(frames, codes, path, char_cap),
                               schema=NIGHT_STATS_SCHEMA).collect()
    output: dict = {}
    inputs: dict = {}
    for r in parts:
        out = output.setdefault(r["note_date"], {"notes": 0, "predicted": 0, "positives": np.zeros(len(codes)),
                                                 "probability_sums": np.zeros(len(codes))})
        out["notes"] += int(r["notes"])
        out["predicted"] += int(r["predicted"])
        out["positives"] += np.asarray(r["positives"], dtype=np.float64)
        out["probability_sums"] += np.asarray(r["probability_sums"], dtype=np.float64)
        if not r["measured"]:
            continue
        inp = inputs.setdefault(r["note_date"], {"notes": 0, "words": 0, "oov_words": 0, "lengths": Counter(),
                                                 "note_types": Counter()})
        inp["notes"] += int(r["measured"])
        inp["words"] += int(r["words"])
        inp["oov_words"] += int(r["oov_words"])
        inp["lengths"].update(dict(zip(r["lengths"], r["length_notes"])))
        inp["note_types"].update(dict(zip(r["note_types"], r["type_notes"])))
    return output, inputs


def night_rows(profile: dict, codes: tuple, dc, n_notes: int, output: dict | None, inputs: dict | None) -> list[dict]:
    """The night's rows (dicts of kind, name, value, baseline, train_rate, drift, limit, flagged, detail), the
    summary row first. `output` and `inputs`: the night's entries of `night_stats` (None: nothing)."""
    judged = n_notes >= dc.min_notes
    rows: list[dict] = []

    def add(kind, name, value=None, baseline=None, drift=None, limit=None, detail=None, train_rate=None):
        over = judged and limit is not None and drift is not None and drift > limit
        rows.append({"kind": kind, "name": name, "value": value, "baseline": baseline, "train_rate": train_rate,
                     "drift": drift, "limit": limit, "flagged": bool(over), "detail": detail})
        return over

    # model outputs against dev at training time
    codes_info, dev = profile.get("codes") or {}, profile.get("dev")
    code_flags = 0
    if dev is None:
        add("output", "code_psi", detail="the training profile has no dev reference (no dev notes)")
    elif output is not None and n_notes:
        expected = np.array([codes_info.get(c, {}).get("mean_probability") or 0.0 for c in codes])
        actual = output["probability_sums"] / n_notes
        add("output", "code_psi", drift=psi(expected, actual), limit=dc.code_psi_limit,
            detail=f"over {len(codes)} codes")
        per_note = output["predicted"] / n_notes
        add("output", "codes_per_note", value=per_note, baseline=dev["codes_per_note"],
            drift=per_note - dev["codes_per_note"])
        for j, code in enumerate(codes):
            ref = codes_info.get(code, {})
            rate, base = output["positives"][j] / n_notes, ref.get("rate")
            if base is None:
                add("code", code, value=rate, train_rate=ref.get("train_rate"), detail="no dev rate")
                continue
            noise = 3 * math.sqrt(max(base * (1 - base), 1.0 / n_notes) / n_notes)
            diff = rate - base
            # flagged when the move is both material (the limit) and beyond 3 binomial standard errors
            limit = max(dc.code_rate_limit, noise)
            code_flags += add("code", code, value=rate, baseline=base, train_rate=ref.get("train_rate"),
                              drift=abs(diff), limit=limit, detail=f"{diff:+.3f}")
        add("output", "codes_shifted", value=float(code_flags), detail=f"code rows flagged of {len(codes)}")

    # inputs against the train notes
    inputs = inputs or {}
    lengths = inputs.get("lengths") or {}
    words = np.repeat(np.array(list(lengths), dtype=np.int64), np.array(list(lengths.values()), dtype=np.int64))
    n_measured = int(len(words))
    length = profile["note_length"]
    if n_measured:
        night_counts = bin_counts(words, length["edges"])
        add("input", "note_length", value=float(np.median(words)), baseline=length["median"],
            drift=psi(length["counts"], night_counts),
            limit=max(dc.note_length_psi_limit, noise_psi(len(night_counts), n_measured)),
            detail=f"words per note; {len(length['counts'])} bins")
        total = int(inputs["words"])
        share = float(inputs["oov_words"] / total) if total else 0.0
        base = profile["oov"]["share"]
        add("input", "oov_share", value=share, baseline=base,
            drift=share - base if base is not None else None, limit=dc.oov_share_limit)
    types = profile.get("note_types")
    if types is None:
        add("input", "note_type", detail=f"no training note types: {profile.get('note_types_reason')}")
    elif n_measured:
        night_types = Counter(inputs["note_types"])
        names = sorted(set(types) | set(night_types))
        expected = np.array([types.get(n, 0) for n in names], dtype=np.float64)
        actual = np.array([night_types.get(n, 0) for n in names], dtype=np.float64)
        terms = psi_terms(expected, actual)
        new = sorted(n for n in night_types if n not in types)
        add("input", "note_type", value=sum(night_types[n] for n in new) / n_measured, drift=float(terms.sum()),
            limit=max(dc.note_type_psi_limit, noise_psi(len(names), n_measured)),
            detail=f"new types: {', '.join(new)}" if new else None)
        for name, e, a, term in zip(names, expected, actual, terms):
            add("note_type", name, value=a / actual.sum(), baseline=e / expected.sum() if expected.sum() else None,
                drift=float(term))

    flagged = [r for r in rows if r["flagged"] and r["kind"] in ("output", "input")]
    if not n_notes:
        detail = "no note scored"
    elif not judged:
        detail = f"{n_notes} notes scored, fewer than drift.min_notes = {dc.min_notes}: not judged"
    else:
        detail = ("flagged: " + "; ".join(f"{r['name']} {r['drift']:.3f} > {r['limit']:g}" for r in flagged)
                  if flagged else None)
    rows.insert(0, {"kind": "night", "name": "summary", "value": float(len(flagged)), "baseline": None,
                    "train_rate": None, "drift": None, "limit": None, "flagged": bool(flagged), "detail": detail})
    return rows


def run_night_drift(wh, cfg, run, info, notes, nights: list[str]) -> dict | None:
    """Measure this run's scored nights against the model's training profile and write bertxml.night_drift
    (replaceWhere model_version and those nights: one transaction). `notes`: the night's notes given to the
    model (note_id, note_date, note_type, text); `info`: `bertxml.models.modeldir.ModelInfo`; `nights`: the batches
    scored ('YYYY-MM-DD' or 'undated'). Counts go to the job's `run`. Returns {night: flagged names}, or
    None when skipped (drift off, no profile, nothing scored)."""
    dc = cfg.drift
    dated = [d for d in nights if d != "undated"]
    if not dc.enabled or not dated:
        return None
    profile, reason = load_profile(info.model_dir)
    if profile is None:
        log.warning("night drift skipped: %s", reason)
        run.count("drift", f"skipped: {reason}")
        return None
    started = time.perf_counter()
    preds_name = wh.name(t.PREDICTIONS)
    if not wh.exists(preds_name):
        run.count("drift", "skipped: no predictions table")
        return None
    version = run.outputs.get(preds_name)
    days = [dt.date.fromisoformat(d) for d in dated]
    preds = (wh.table(preds_name, version=version)
             .filter((F.col("model_version") == info.model_version) & F.col("note_date").isin(days)))
    char_cap = cfg.score.max_chunks_per_note * info.max_len * CHARS_PER_WORD_CAP
    output, per_night = night_stats(preds, notes, info.codes, info.model_dir / "tokenizer.json", char_cap)

    computed_at = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None, microsecond=0)
    records, summary = [], {}
    for day in days:
        out = output.get(day)
        n = out["notes"] if out else 0
        rows = night_rows(profile, info.codes, dc, n, out, per_night.get(day))
        flagged = [r["name"] for r in rows if r["flagged"] and r["kind"] in ("output", "input")]
        summary[day.isoformat()] = {"notes": n, "flagged": flagged, "codes_flagged":
                                    sum(1 for r in rows if r["kind"] == "code" and r["flagged"])}
        if flagged:
            log.warning("score: drift on %s (model %s): %s", day, info.model_version, rows[0]["detail"])
        for r in rows:
            records.append((day, info.model_version, r["kind"], r["name"], _num(r["value"]), _num(r["baseline"]),
                            _num(r["train_rate"]), _num(r["drift"]), _num(r["limit"]), r["flagged"], n,
                            r["detail"], run.run_id, computed_at))
    name = wh.name(t.NIGHT_DRIFT)
    scope = (f"model_version = {sql_string(info.model_version)} AND note_date IN ("
             + ", ".join(f"DATE'{d}'" for d in dated) + ")")
    run.outputs[name] = wh.write(local_frame(wh.spark, records, t.NIGHT_DRIFT_SCHEMA), name, replace_where=scope)
    run.count("drift", summary)
    run.count("drift_flagged_nights", sorted(d for d, s in summary.items() if s["flagged"]))
    run.count("drift_seconds", round(time.perf_counter() - started, 2))
    return {d: s["flagged"] for d, s in summary.items()}


def _num(value):
    return None if value is None or (isinstance(value, float) and not math.isfinite(value)) else float(value)
