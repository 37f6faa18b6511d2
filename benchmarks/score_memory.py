"""What a scoring worker's resident memory does over a long night (figures, not a test).

    .venv/bin/python benchmarks/score_memory.py --model DIR --notes-table PATH [--notes 2304] [--batch 256]
                                                [--variants evidence,plain,trim]

A Spark scoring task runs `bertxml.scoring.udf.score_frames`: one predictor per Python worker
(`make_predict_fn` with the options `bertxml score` passes), fed the night's notes an Arrow batch at a time.
This script does the same in one process, without Spark, and prints the process's resident memory after
each batch, so growth from batch to batch shows. Each variant runs in a fresh process:
- `evidence`: the defaults (`score.evidence` on, `evidence_top_k` 3);
- `plain`: evidence off;
- `trim`: evidence off, and glibc's `malloc_trim(0)` after every batch (memory freed but kept by malloc
  arenas is given back: what remains is held);
- `repeat`: evidence off, the first batch's notes every time: the same passes, the same tensor shapes.
The notes are the first non-empty texts of a Delta table (`--notes-table`, e.g. WORKDIR/tables/ehr/notes),
read a batch at a time with the project's JVM-free reader; only counts and sizes are printed, never text.
"""
from __future__ import annotations

import argparse
import ctypes
import subprocess
import sys
import time

import psutil

VARIANTS = {"evidence": {"evidence_top_k": 3}, "plain": {"evidence_top_k": 0},
            "trim": {"evidence_top_k": 0}, "repeat": {"evidence_top_k": 0}}
GIB = 1024 ** 3


def one(args) -> None:
    from bertxml.config import ScoreConfig, score_options
    from bertxml.scoring.predictors import make_predict_fn
    from normalizer import read_table_notes

    texts = read_table_notes(args.notes_table, args.notes)   # a batch at a time: not the whole table
    options = {**score_options(ScoreConfig()), **VARIANTS[args.one]}
    predict = make_predict_fn(args.model, "cpu", **options)
    libc = ctypes.CDLL("libc.so.6") if args.one == "trim" else None
    me = psutil.Process()
    print(f"[{args.one}] {len(texts):,} notes, options {options}; resident after loading the model "
          f"{me.memory_info().rss / GIB:.2f} GiB", flush=True)
    started, sizes = time.perf_counter(), []
    for i in range(0, len(texts), args.batch):
        predict.score(texts[:args.batch] if args.one == "repeat" else texts[i:i + args.batch])
        if libc is not None:
            libc.malloc_trim(0)
        sizes.append(me.memory_info().rss / GIB)
        print(f"[{args.one}] batch {i // args.batch + 1:3d}: resident {sizes[-1]:.2f} GiB, "
              f"{time.perf_counter() - started:.0f}s", flush=True)
    growth = (sizes[-1] - sizes[0]) / max(1, len(sizes) - 1) * 1024
    print(f"RESULT {args.one}: {sizes[0]:.2f} -> {sizes[-1]:.2f} GiB over {len(sizes)} batches of {args.batch} "
          f"({growth:.0f} MiB a batch after the first), {time.perf_counter() - started:.0f}s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="a model folder")
    parser.add_argument("--notes-table", required=True, help="a Delta table with a `text` column")
    parser.add_argument("--notes", type=int, default=2304)
    parser.add_argument("--batch", type=int, default=256, help="notes per batch (score.arrow_batch_notes)")
    parser.add_argument("--variants", default="evidence,plain,trim,repeat")
    parser.add_argument("--one", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        one(args)
        return
    from machine import describe_machine

    print(describe_machine(), flush=True)
    results = []
    for variant in args.variants.split(","):
        if variant not in VARIANTS:
            parser.error(f"unknown variant {variant!r}; choose from {','.join(VARIANTS)}")
        out = subprocess.run([sys.executable, __file__, "--one", variant, "--model", args.model,
                              "--notes-table", args.notes_table, "--notes", str(args.notes),
                              "--batch", str(args.batch)], capture_output=True, text=True)
        lines = [line for line in out.stdout.splitlines() if line.startswith(("[", "RESULT"))]
        print("\n".join(lines), flush=True)
        if out.returncode:
            print(f"[{variant}] failed (exit {out.returncode}): {out.stderr.strip().splitlines()[-1:]}")
        results += [line for line in lines if line.startswith("RESULT")]
    print("\n".join(results))


if __name__ == "__main__":
    main()
