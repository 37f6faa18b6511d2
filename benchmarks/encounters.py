"""What encounter-level predictions and review bands cost the nightly job (figures, not a test).

    .venv/bin/python benchmarks/encounters.py [--notes 1500] [--labels 2292] [--nights 3] [--reps 3]

On a generated warehouse (`bertxml generate`, seed 7) and a tiny random-init model with --labels codes (the
paper's 2,292 by default, so the probability arrays the encounter step reads and maximises are full size),
it scores the warehouse's last --nights nights one `bertxml score --date` at a time, then reruns each
night --reps times and reports, per night: the notes scored, the encounters touched, the whole job's
wall time, and the time of the encounter step alone (`write_encounter_predictions`, timed inside the job);
the step's share of the job is the added cost (the bands are a numpy comparison inside the UDF, timed with
the model's forward in `scoring_seconds`). The drift step (`run_night_drift`) is timed the same way: the
model folder carries a drift profile measured on a sample of the warehouse's notes, so it runs in full.
Best of --reps per night (the fastest job, with its steps' times), since the machine is shared.
Figures and their history: benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bertxml.scoring import drift, encounters  # noqa: E402
from bertxml.config import ModelConfig, VocabConfig  # noqa: E402
from bertxml.config_io import load_config  # noqa: E402
from bertxml.models.bert import BertForIcdCoding, bert_config, save_model  # noqa: E402
from bertxml.models.modeldir import write_model_dir  # noqa: E402
from bertxml.models.profile import (PROFILE_VERSION, add_dev_reference, bin_counts, length_edges,  # noqa: E402
                                    word_stats)


def build_model(root: Path, wh, n_labels: int) -> Path:
    """A tiny random model folder with n_labels codes (the warehouse's codes first), a vocabulary trained on
    a sample of the warehouse's notes, and operating points that put a third of the codes in each band."""
    from bertxml.text.vocab import train_tokenizer

    sample = wh.table("ehr.notes").select("text", "note_type").limit(300).collect()
    texts = [r.text for r in sample]
    tokenizer = train_tokenizer([texts], VocabConfig(size=2000, min_frequency=2, min_patients=1))
    out = root / "bench-model"
    out.mkdir(parents=True)
    tokenizer.save(str(out / "tokenizer.json"))
    seen = sorted({r.icd10_code for r in wh.table("ehr.diagnoses").select("icd10_code").distinct().collect()
                   if r.icd10_code})
    codes = (seen + [f"X{i:05d}" for i in range(n_labels)])[:n_labels]
    torch.manual_seed(0)
    mcfg = ModelConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       max_position_embeddings=128, max_len=128, head="bertxml")
    save_model(BertForIcdCoding(bert_config(mcfg, tokenizer.get_vocab_size()), n_labels, "bertxml"), out)
    labels = [{"label_index": i, "code": c, "description": c, "train_count": 10, "is_chronic": False}
              for i, c in enumerate(codes)]
    point = {"support": 50, "f1": None, "auto": {"threshold": 0.55, "precision": 0.9, "recall": 0.5},
             "review": {"threshold": 0.45, "precision": 0.4, "recall": 0.9}}
    # a drift reference from the same sample, so the nightly drift step runs in full (a folder without one
    # skips it); the dev answers are random probabilities at the model's thresholds
    words, oov = word_stats(tokenizer, texts)
    edges = length_edges(words, 5)
    profile = {"profile_version": PROFILE_VERSION, "train_notes": len(texts), "measured_notes": len(texts),
               "note_length": {"unit": "words", "edges": edges, "counts": bin_counts(words, edges).tolist(),
                               "median": float(np.median(words)), "mean": float(words.mean())},
               "oov": {"words": int(words.sum()), "oov_words": int(oov.sum()),
                       "share": float(oov.sum() / max(1, words.sum()))},
               "note_types": dict(Counter(r.note_type or "(none)" for r in sample)), "note_types_reason": None,
               "codes": {c: {"train_rate": 0.01} for c in codes}, "dev": None}
    dev = np.random.default_rng(0).random((200, n_labels), dtype=np.float32) ** 8
    profile = add_dev_reference(profile, codes, dev, np.full(n_labels, 0.5))
    write_model_dir(out, model_version="bench-encounters", model_kind="bertxml", config={}, inputs={}, max_len=128,
                    dev_metrics={}, parameters=0, train_seconds=0.0, tokenizer_file=out / "tokenizer.json",
                    label_vocab=labels, thresholds={c: 0.5 for c in codes},
                    operating_points={"targets": {}, "codes": {c: point for c in codes[::3]}},
                    drift_profile=profile)
    return out


def band_cost(n_labels: int, notes: int = 256, reps: int = 20) -> None:
    """The bands inside the UDF: `predicted_bands` against the plain `predicted_codes` it replaced, on one
    Arrow batch of notes (score.arrow_batch_notes = 256) at n_labels codes, best of reps."""
    from bertxml.models.modeldir import ModelInfo, predicted_bands, predicted_codes

    rng = np.random.default_rng(0)
    probs = rng.random((notes, n_labels), dtype=np.float32) ** 8  # a few codes per note over 0.5
    codes = tuple(f"C{i}" for i in range(n_labels))
    info = ModelInfo(model_dir=Path("."), model_version="x", model_kind="bertxml", max_len=512, labels=(),
                     codes=codes, thresholds=np.full(n_labels, 0.5, dtype=np.float32),
                     auto_thresholds=np.full(n_labels, 0.8, dtype=np.float32),
                     review_thresholds=np.full(n_labels, 0.3, dtype=np.float32))
    arr = np.array(codes, dtype=object)
    best = {}
    for name, fn in (("predicted_codes", lambda: predicted_codes(probs, arr, info.thresholds)),
                     ("predicted_bands", lambda: predicted_bands(probs, info))):
        times = []
        for _ in range(reps):
            started = time.perf_counter()
            fn()
            times.append(time.perf_counter() - started)
        best[name] = min(times)
    print(f"bands in the UDF, per batch of {notes} notes x {n_labels} codes: predicted_codes "
          f"{best['predicted_codes'] * 1e3:.2f} ms, predicted_bands {best['predicted_bands'] * 1e3:.2f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--notes", type=int, default=1500)
    parser.add_argument("--labels", type=int, default=2292)
    parser.add_argument("--nights", type=int, default=3)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from bertxml.etl.span import last_date
    from bertxml.etl.generate import run_generate
    from bertxml.scoring import score as score_job
    from bertxml.scoring.score import run_score
    from bertxml.platform.warehouse import Warehouse, get_spark

    cfg = load_config([], [])
    cfg.generate.notes, cfg.generate.seed = args.notes, 7
    cfg.score.partitions = 1
    step = {"encounters": 0.0, "drift": 0.0}

    def timed(key, real):
        def wrapper(*a, **k):
            started = time.perf_counter()
            try:
                return real(*a, **k)
            finally:
                step[key] = time.perf_counter() - started
        return wrapper

    # the names the nightly job calls (imported at the top of bertxml.scoring.score)
    score_job.write_encounter_predictions = timed("encounters", encounters.write_encounter_predictions)
    score_job.run_night_drift = timed("drift", drift.run_night_drift)
    band_cost(args.labels)
    with tempfile.TemporaryDirectory() as tmp:
        wh = Warehouse(get_spark(cfg, "bench-encounters"), Path(tmp) / "wh", cfg)
        run_generate(wh, cfg.generate)
        model = build_model(Path(tmp), wh, args.labels)
        nights = [last_date() - dt.timedelta(days=k) for k in range(args.nights - 1, -1, -1)]
        for night in nights:  # the first pass creates the tables; the reps below are steady-state nights
            run_score(wh, cfg, date=night, model_dir=model)
        rows = []
        for night in nights:
            best = None
            for _ in range(args.reps):
                started = time.perf_counter()
                counts = run_score(wh, cfg, date=night, model_dir=model)
                total = time.perf_counter() - started
                if best is None or total < best[0]:
                    best = (total, step["encounters"], step["drift"], counts)
            total, enc, drf, counts = best
            touched = counts.get("encounters_updated", 0) + counts.get("encounters_inserted", 0)
            rows.append((night, counts["notes_scored"], touched, total, enc, drf))
        n_enc = wh.table(wh.name("encounter_predictions")).count()
        multi = wh.table(wh.name("encounter_predictions")).filter("n_notes > 1").count()
    print(f"warehouse: {args.notes} generated notes, {args.labels} codes; {n_enc} encounters scored, "
          f"{multi} with more than one note; best of {args.reps} reruns per night")
    print("| night | notes scored | encounters touched | job (s) | encounter step (s) | share | drift step (s) "
          "| share |")
    print("|---|---|---|---|---|---|---|---|")
    for night, n, touched, total, enc, drf in rows:
        print(f"| {night} | {n} | {touched} | {total:.2f} | {enc:.2f} | {enc / total:.0%} | {drf:.2f} "
              f"| {drf / total:.0%} |")
    job, enc, drf = (float(sum(r[k] for r in rows)) for k in (3, 4, 5))
    print(json.dumps({"job_s": round(job, 2), "encounter_s": round(enc, 2), "share": round(enc / job, 3),
                      "drift_s": round(drf, 2), "drift_share": round(drf / job, 3)}))


if __name__ == "__main__":
    main()
