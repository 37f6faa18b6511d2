"""ETL throughput and its cost relative to a plain Spark copy of the notes table (figures, not a test).

    .venv/bin/python benchmarks/etl.py [--sizes 100000 1000000] [--rounds 3] [--warmups 1]
                                       [--workdir /tmp/bertxml-bench-etl] [--io-encryption on|off|both]

For each size: generate a warehouse of that many notes, run `warmups` copies and ETLs untimed (the files
are read once, and each has compiled its Spark code; the first ETL in a process spends seconds more on
that, printed as "cold"; the JVM's JIT keeps compiling the ETL's code paths for several more rounds, so
more warm-ups measure a longer-running process), then time `rounds` pairs of (a) a plain read-and-write
copy of the notes table to a new Delta table and (b) the full ETL on the same notes. Prints every pair
and the medians: notes/s and the ratio ETL/copy (target <= 3), and the scaling of ETL time from the
smallest to the largest size (target: 10x the notes costs <= 11x the time). Copy and ETL alternate in
one Spark session, so machine noise (large on a shared 2-core VM) hits both alike.

`--io-encryption` sets spark.io.encryption.enabled (SparkConfig.io_encryption, on by default). It is fixed
when Spark starts, so `both` runs the whole benchmark once per setting, each in a child process of its own
(off first, then on), and prints the ratio of the ETL medians, on / off.
"""
from __future__ import annotations

import argparse
import logging
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bertxml.config import Config
from bertxml.etl.etl import run_etl
from bertxml.etl.generate import run_generate
from bertxml.platform.warehouse import Warehouse, get_spark


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
    parser.add_argument("--io-encryption", choices=["on", "off", "both"], default="on",
                        help="spark.io.encryption.enabled; both: one child process per setting")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.io_encryption == "both":
        both(sys.argv[1:])
        return

    cfg = Config()
    cfg.spark.io_encryption = args.io_encryption == "on"
    print(f"spark.io.encryption.enabled={str(cfg.spark.io_encryption).lower()}", flush=True)
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
    for size, _, _, copy_s, etl_s in results:
        print(f"MEDIANS size={size} copy_s={copy_s:.3f} etl_s={etl_s:.3f}")
    spark.stop()


def both(argv: list[str]) -> None:
    """Run this benchmark with spark.io.encryption.enabled off, then on, and print the cost of encryption."""
    argv = [a for i, a in enumerate(argv)
            if a != "--io-encryption" and not (i > 0 and argv[i - 1] == "--io-encryption")
            and not a.startswith("--io-encryption=")]
    medians: dict[str, dict[int, tuple[float, float]]] = {}
    for setting in ("off", "on"):
        out = subprocess.run([sys.executable, __file__, *argv, "--io-encryption", setting],
                             check=True, capture_output=True, text=True).stdout
        print(out, end="", flush=True)
        for line in out.splitlines():
            if line.startswith("MEDIANS "):
                fields = dict(kv.split("=") for kv in line.split()[1:])
                medians.setdefault(setting, {})[int(fields["size"])] = (float(fields["copy_s"]),
                                                                       float(fields["etl_s"]))
    print("\nio encryption: medians off -> on")
    print("notes      copy_off_s  copy_on_s  etl_off_s  etl_on_s  etl on/off  copy on/off")
    for size, (copy_off, etl_off) in medians["off"].items():
        copy_on, etl_on = medians["on"][size]
        print(f"{size:<10} {copy_off:<11.2f} {copy_on:<10.2f} {etl_off:<10.2f} {etl_on:<9.2f} "
              f"{etl_on / etl_off:<11.3f} {copy_on / copy_off:.3f}")


if __name__ == "__main__":
    main()
