"""ETL throughput and its cost relative to a plain Spark copy of the notes table (figures, not a test).

    .venv/bin/python benchmarks/etl.py [--sizes 100000 1000000] [--rounds 3] [--warmups 1]
                                       [--workdir /tmp/bertxml-bench-etl]

For each size: generate a warehouse of that many notes, run `warmups` copies and ETLs untimed (the files
are read once, and each has compiled its Spark code; the first ETL in a process spends seconds more on
that, printed as "cold"; the JVM's JIT keeps compiling the ETL's code paths for several more rounds, so
more warm-ups measure a longer-running process), then time `rounds` pairs of (a) a plain read-and-write
copy of the notes table to a new Delta table and (b) the full ETL on the same notes. Prints every pair
and the medians: notes/s and the ratio ETL/copy (target <= 3), and the scaling of ETL time from the
smallest to the largest size (target: 10x the notes costs <= 11x the time). Copy and ETL alternate in
one Spark session, so machine noise (large on a shared 2-core VM) hits both alike.
"""
from __future__ import annotations

import argparse
import logging
import shutil
import statistics
import time
from pathlib import Path

from bertxml.config import Config
from bertxml.etl import run_etl
from bertxml.generate import run_generate
from bertxml.warehouse import Warehouse, get_spark


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--rounds", type=int, default=3, help="timed (copy, ETL) pairs per size")
    parser.add_argument("--warmups", type=int, default=1, help="untimed (copy, ETL) pairs first, per size")
    parser.add_argument("--workdir", default="/tmp/bertxml-bench-etl")
    parser.add_argument("--keep", action="store_true", help="keep the generated warehouses")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    cfg = Config()
    cfg.etl.min_code_count = 10
    spark = get_spark(cfg, app="bertxml-bench-etl")
    results = []
    for size in args.sizes:
        root = Path(args.workdir) / f"n{size}"
        shutil.rmtree(root, ignore_errors=True)
        wh = Warehouse(spark, root, cfg)
        cfg.generate.notes = size
        cfg.generate.partitions = max(8, size // 25_000)
        gen_s = timed(lambda: run_generate(wh, cfg.generate))
        n_rows = wh.table(cfg.warehouse.notes).count()

        def copy():
            wh.write(wh.table(cfg.warehouse.notes), "bench.notes_copy")

        for w in range(max(args.warmups, 1)):  # not in the medians
            copy_s, etl_s = timed(copy), timed(lambda: run_etl(wh, cfg))
            print(f"{size:>9,} notes, {'cold' if w == 0 else f'warm-up {w + 1}'}: plain copy {copy_s:6.1f}s | "
                  f"ETL {etl_s:6.1f}s", flush=True)
        copies, etls = [], []
        for r in range(args.rounds):
            copies.append(timed(copy))
            etls.append(timed(lambda: run_etl(wh, cfg)))
            print(f"{size:>9,} notes, round {r + 1}: plain copy {copies[-1]:6.1f}s | ETL {etls[-1]:6.1f}s | "
                  f"ETL/copy {etls[-1] / copies[-1]:4.2f}", flush=True)
        copy_s, etl_s = statistics.median(copies), statistics.median(etls)
        results.append((size, n_rows, gen_s, copy_s, etl_s))
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)

    print(f"\nmedians of {args.rounds} rounds")
    print("notes      rows       generate_s  copy_s   etl_s   etl_notes_per_s  etl/copy")
    for size, n_rows, gen_s, copy_s, etl_s in results:
        print(f"{size:<10} {n_rows:<10} {gen_s:<11.1f} {copy_s:<8.1f} {etl_s:<7.1f} {n_rows / etl_s:<16.0f} "
              f"{etl_s / copy_s:.2f}")
    if len(results) > 1:
        (s0, _, _, _, e0), (s1, _, _, _, e1) = results[0], results[-1]
        print(f"scaling: {s1 / s0:.0f}x the notes took {e1 / e0:.2f}x the ETL time")
    spark.stop()


if __name__ == "__main__":
    main()
