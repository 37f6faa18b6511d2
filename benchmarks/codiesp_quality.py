"""Model quality on a path-mode warehouse (e.g. CodiEsp), without Spark: the figures of README "Real coded notes".

    python benchmarks/codiesp_quality.py logreg-words --workdir /tmp/q16/wh --conf conf/codiesp.yaml [--split test]
    python benchmarks/codiesp_quality.py logreg-pieces --workdir /tmp/q16/wh --conf conf/codiesp.yaml [--split test]
    python benchmarks/codiesp_quality.py measure --workdir /tmp/q16/wh --conf conf/codiesp.yaml --model DIR [--split test]

`logreg-words` is the strengthened bag-of-words bar of issue 16: word unigrams and bigrams of the whole note
(scikit-learn TfidfVectorizer, sublinear tf, min_df 2), one L2 logistic regression per code (liblinear), C
chosen on dev macro AUC from a grid; per-code thresholds tuned on dev. With --split test it prints the dev
grid, then the test figures of the dev-selected C (the test split read once).

`measure` scores one split through a model folder's predictor (`bertxml.reports.compare.measure`: the scorer's own
chunking, max over chunks) and prints the same metrics as `bertxml compare`.

Every figure: micro/macro AUC, Table 3's macro AUC over codes with fewer than compare.low_freq_threshold train
notes, micro F1 at the dev-tuned thresholds, P@5 (bertxml.metrics.auc_report_from_arrays). Note text is
read in memory only and never printed.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bertxml.platform import tables as t  # noqa: E402
from bertxml.config_io import load_config  # noqa: E402
from bertxml.platform.deltaread import table_path  # noqa: E402
from bertxml.platform.deltaread import read_delta  # noqa: E402

C_GRID = (1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0)


def split_rows(workdir, cfg, split: str):
    """(texts, codes) of one split of labeled_notes (latest version), in note_id order."""
    table = read_delta(str(table_path(workdir, cfg.warehouse.schema, t.LABELED_NOTES)), None,
                       columns=["note_id", "split", "text", "codes"]).to_pylist()
    rows = sorted((r for r in table if r["split"] == split), key=lambda r: r["note_id"])
    return [r["text"] or "" for r in rows], [list(r["codes"] or []) for r in rows]


def label_vocab(workdir, cfg) -> list[dict]:
    rows = read_delta(str(table_path(workdir, cfg.warehouse.schema, t.LABEL_VOCAB)), None).to_pylist()
    return sorted(rows, key=lambda r: r["label_index"])


def fmt(report: dict) -> str:
    keys = ("micro_auc", "macro_auc", "macro_auc_low_freq", "micro_f1", "p_at_5")
    out = " ".join(f"{k} {report[k]:.3f}" if report.get(k) is not None else f"{k} n/a" for k in keys)
    return f"{out} (codes {report['n_codes_scored']}, rare {report['n_codes_low_freq']}, notes {report['n_notes']})"


def logreg_words(args, cfg) -> None:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    from bertxml.reports.compare import label_matrix
    from bertxml.metrics import auc_report_from_arrays
    from bertxml.training.thresholds import tune_thresholds

    labels = label_vocab(args.workdir, cfg)
    codes = [r["code"] for r in labels]
    train_counts = np.array([int(r.get("train_count") or 0) for r in labels])
    low = cfg.compare.low_freq_threshold
    (x_tr, c_tr), (x_dev, c_dev) = split_rows(args.workdir, cfg, "train"), split_rows(args.workdir, cfg, "dev")
    y_tr, y_dev = label_matrix(c_tr, codes), label_matrix(c_dev, codes)
    started = time.perf_counter()
    vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=2, lowercase=True)
    f_tr = vec.fit_transform(x_tr)
    print(f"logreg-words: {len(x_tr)} train notes, {len(x_dev)} dev, {len(codes)} codes, "
          f"{f_tr.shape[1]} word 1-2gram features")

    def fit_predict(c: float, rows) -> np.ndarray:
        out = np.zeros((rows.shape[0], len(codes)), dtype=np.float32)
        for j in range(len(codes)):
            y = y_tr[:, j]
            if 0 < y.sum() < len(y):
                clf = LogisticRegression(C=c, solver="liblinear", max_iter=200, random_state=13).fit(f_tr, y)
                out[:, j] = clf.predict_proba(rows)[:, 1]
            else:
                out[:, j] = (y.sum() + 0.5) / (len(y) + 1.0)
        return out

    f_dev = vec.transform(x_dev)
    best = None
    for c in ([args.c] if args.c else C_GRID):
        probs = fit_predict(c, f_dev)
        thr = tune_thresholds(probs, y_dev)
        rep = auc_report_from_arrays(y_dev, probs, train_counts, low, thr)
        print(f"  dev C={c:g}: {fmt(rep)}")
        if best is None or rep["macro_auc"] > best[1]["macro_auc"]:
            best = (c, rep, thr)
    c, rep, thr = best
    print(f"dev-selected C={c:g}: {fmt(rep)}  [{time.perf_counter() - started:.0f} s for the grid]")
    if args.split == "test":
        x_te, c_te = split_rows(args.workdir, cfg, "test")
        started = time.perf_counter()
        probs = fit_predict(c, vec.transform(x_te))
        rep = auc_report_from_arrays(label_matrix(c_te, codes), probs, train_counts, low, thr)
        print(f"test C={c:g}: {fmt(rep)}  [fit {time.perf_counter() - started:.1f} s]")


def logreg_pieces(args, cfg) -> None:
    """The library's logistic regression (bag of WordPieces of the first 512 tokens, `bertxml train --model
    logreg`) trained on the workdir's tables into --model (or /tmp), then measured on --split."""
    import tempfile

    from bertxml.training import baselines

    out = Path(args.model or tempfile.mkdtemp(prefix="logreg-pieces-"))
    inputs = baselines.resolve_baseline_inputs(Path(args.workdir), cfg, "logreg", out_dir=out)
    baselines.train_baseline(inputs, cfg)
    args.model = str(out)
    measure_model(args, cfg)


def measure_model(args, cfg) -> None:
    from bertxml.reports.compare import measure

    texts, codes = split_rows(args.workdir, cfg, args.split)
    started = time.perf_counter()
    rep = measure(Path(args.model), texts, codes, cfg, cfg.compare.low_freq_threshold)
    manifest = json.loads((Path(args.model) / "manifest.json").read_text()) \
        if (Path(args.model) / "manifest.json").exists() else {}
    print(f"{args.split} {Path(args.model).name}: {fmt(rep)}  [scored in {time.perf_counter() - started:.0f} s; "
          f"train_seconds {manifest.get('train_seconds', 0):.0f}]")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("logreg-words", "logreg-pieces", "measure"))
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--conf", action="append", default=[])
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--split", default="dev", choices=("dev", "test"))
    parser.add_argument("--model")
    parser.add_argument("--c", type=float, help="logreg-words: this C only (e.g. the one the dev grid chose)")
    args = parser.parse_args(argv)
    cfg = load_config(args.conf, args.set)
    if args.what == "logreg-words":
        logreg_words(args, cfg)
    elif args.what == "logreg-pieces":
        logreg_pieces(args, cfg)
    else:
        if not args.model:
            parser.error("measure needs --model DIR")
        measure_model(args, cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
