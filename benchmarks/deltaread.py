"""Reading `bertxml.chunks` without a JVM, as training does: `bertxml.platform.deltaread.read_delta` (figures, not a test).

    .venv/bin/python benchmarks/deltaread.py [--notes 20000] [--chunks-per-note 2] [--commits 4] [--rounds 5]
                                             [--workdir /tmp/bertxml-bench-deltaread]

Builds once (with Spark, reused when the folder exists) a chunks-shaped Delta table: `notes` notes of
`chunks-per-note` chunks of 512 token ids each, 70/10/20 train/dev/test, written in `commits` appends, plus
the same notes at max_len 1024 in one more append (what `bertxml tokenize --max-len 1024` adds). Then times,
with the `bertxml` on PYTHONPATH (so the same table can be read by two versions of the reader):
- `train split, 512`: what `bertxml.text.data.load_chunks` reads for training (every column, one split, one length);
- `note ids, chunk 0`: the baselines' first pass (one column, a filter on three columns);
- `latest version`: the version the driver pins.
Prints the median and min of `rounds` reads, and the rows read.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

import bertxml.platform.deltaread as deltaread


def build(path: Path, notes: int, per_note: int, commits: int) -> None:
    from bertxml.platform import tables as t
    from bertxml.config import Config
    from bertxml.platform.warehouse import get_spark

    cfg = Config()
    cfg.spark.master, cfg.spark.shuffle_partitions = "local[2]", 2
    spark = get_spark(cfg, app="bench-deltaread")
    rng = np.random.default_rng(0)
    splits = np.array(["train"] * 7 + ["dev"] + ["test"] * 2)

    def rows(lo, hi, max_len):
        for i in range(lo, hi):
            split = str(splits[i % 10])
            labels = sorted(set(rng.integers(0, 50, 4).tolist()))
            for c in range(per_note if max_len == 512 else max(1, per_note // 2)):
                ids = [2, *rng.integers(5, 12000, max_len - 2).tolist(), 3]
                yield (f"n{i:07d}", split, max_len, c, ids, labels, [1, 200])

    bounds = np.linspace(0, notes, commits + 1).astype(int)
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        spark.createDataFrame(list(rows(lo, hi, 512)), t.CHUNKS_SCHEMA).write.format("delta").mode("append").save(str(path))
    spark.createDataFrame(list(rows(0, notes, 1024)), t.CHUNKS_SCHEMA).write.format("delta").mode("append").save(str(path))
    spark.stop()


def timed(fn, rounds: int):
    seconds, out = [], None
    for _ in range(rounds):
        started = time.perf_counter()
        out = fn()
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds), min(seconds), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--notes", type=int, default=20000)
    ap.add_argument("--chunks-per-note", type=int, default=2)
    ap.add_argument("--commits", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--workdir", default="/tmp/bertxml-bench-deltaread")
    args = ap.parse_args()
    path = Path(args.workdir) / f"chunks-{args.notes}x{args.chunks_per_note}"
    if not (path / "_delta_log").exists():
        build(path, args.notes, args.chunks_per_note, args.commits)
    version = args.commits  # the last append: the 1024-token chunks
    version_of = getattr(deltaread, "latest_version", None) or (lambda p: deltaread.delta_files(p)[0])
    cases = {
        "train split, 512": lambda: deltaread.read_delta(path, version, filter={"max_len": 512, "split": "train"}),
        "note ids, chunk 0": lambda: deltaread.read_delta(path, version, columns=["note_id"],
                                                          filter={"max_len": 512, "split": "train", "chunk_index": 0}),
        "latest version": lambda: version_of(path),
    }
    print(f"reader: {deltaread.__file__}; table: {path} at version {version}")
    print(f"{'case':<20} {'median s':>9} {'min s':>8} {'rows':>8}")
    for name, fn in cases.items():
        median, best, out = timed(fn, args.rounds)
        rows = out.num_rows if hasattr(out, "num_rows") else out
        print(f"{name:<20} {median:>9.3f} {best:>8.3f} {rows:>8}")


if __name__ == "__main__":
    main()
