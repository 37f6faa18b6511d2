"""Generator speed and the shape of its dates (figures, not a test).

    .venv/bin/python benchmarks/generate.py [--sizes 1000000] [--rounds 3] [--structure 20000]
                                            [--workdir /tmp/bertxml-bench-generate]

For each size: `run_generate` into a fresh warehouse `rounds` times (the Spark settings and partitions of
benchmarks/etl.py), printing each round's wall time and the median; then the warehouse's dates: span,
notes per day on weekdays and weekends (median, min, max), the last nights' notes, and encounters per
patient. `--structure N` also times the per-patient structure pass (dates, codes, note metadata; no
text) over N patients in plain Python, where a change to how dates are drawn would show first.
"""
from __future__ import annotations

import argparse
import logging
import shutil
import statistics
import time
from pathlib import Path

from bertxml.config import Config, GenerateConfig
from bertxml.etl.patients import PatientGenerator
from bertxml.etl.generate import run_generate
from bertxml.platform.warehouse import Warehouse, get_spark


def date_profile(wh, table: str) -> None:
    per_day = wh.spark.sql(f"""
        SELECT note_date, dayofweek(note_date) IN (1, 7) AS weekend, count(*) AS n
        FROM {table} GROUP BY note_date""").collect()
    days = sorted(per_day, key=lambda r: r["note_date"])
    print(f"  span {days[0]['note_date']} .. {days[-1]['note_date']}: {len(days)} days with notes")
    for weekend in (False, True):
        counts = sorted(r["n"] for r in days if r["weekend"] == weekend)
        if counts:
            print(f"  {'weekend' if weekend else 'weekday'} notes per day: median {statistics.median(counts):.0f}, "
                  f"min {counts[0]}, max {counts[-1]} ({len(counts)} days)")
    print("  last nights: " + ", ".join(f"{r['note_date']} {r['n']}" for r in days[-5:]))
    enc = wh.spark.sql(f"""SELECT count(DISTINCT encounter_id) AS e, count(DISTINCT patient_id) AS p,
                                  avg(datediff(last, first)) AS history_days
                           FROM {table} JOIN (SELECT patient_id AS pid, min(note_date) AS first,
                                                     max(note_date) AS last FROM {table} GROUP BY patient_id)
                           ON patient_id = pid""").first()
    print(f"  {enc['e']} encounters, {enc['p']} patients: {enc['e'] / enc['p']:.2f} encounters a patient, "
          f"{enc['history_days']:.0f} days from first to last on average")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[1_000_000], help="none: the structure pass only")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--structure", type=int, default=20_000, help="patients for the structure pass; 0: skip")
    parser.add_argument("--workdir", default="/tmp/bertxml-bench-generate")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    if args.structure:
        gen = PatientGenerator(GenerateConfig(notes=args.structure * 5))
        times = []
        for _ in range(5):
            start = time.perf_counter()
            for i in range(args.structure):
                gen.structure(i)
            times.append(time.perf_counter() - start)
        print(f"structure pass, {args.structure:,} patients: median {statistics.median(times):.3f} s "
              f"({', '.join(f'{t:.3f}' for t in times)})", flush=True)

    if not args.sizes:
        return
    cfg = Config()
    spark = get_spark(cfg, app="bertxml-bench-generate")
    for size in args.sizes:
        root = Path(args.workdir) / f"n{size}"
        cfg.generate.notes = size
        cfg.generate.partitions = max(8, size // 25_000)       # as benchmarks/etl.py
        times = []
        for r in range(args.rounds):
            shutil.rmtree(root, ignore_errors=True)
            wh = Warehouse(spark, root, cfg)
            start = time.perf_counter()
            result = run_generate(wh, cfg.generate)
            times.append(time.perf_counter() - start)
            print(f"{size:>9,} notes, round {r + 1}: generate {times[-1]:6.1f} s ({result['notes']:,} note rows)",
                  flush=True)
        print(f"{size:>9,} notes: median {statistics.median(times):.1f} s over {args.rounds} rounds")
        date_profile(wh, cfg.warehouse.notes)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
