"""What one night's MERGE into `bertxml.predictions` reads and rewrites, by table layout (figures, not a test).

    .venv/bin/python benchmarks/merge.py [--nights 365] [--notes-per-night 100] [--labels 47] [--rounds 3]
                                         [--workdir /tmp/bertxml-bench-merge]

Builds a predictions table of `nights` nights x `notes_per_night` notes (probabilities of `labels` codes,
the demo's label count; top codes and predicted codes as the job writes them) in each layout:
- `unpartitioned, a file a night`: what nightly MERGEs into an unpartitioned table leave (an earlier
  bertxml's table);
- `unpartitioned, compacted`: the same after OPTIMIZE (one file);
- `partitioned by note_date`: the layout bertxml creates now (`tables.PREDICTIONS_PARTITIONS`).
Then writes one night (its notes rescored, two of them no longer eligible) the two ways: `MERGE on keys`
(the former write, MERGE on note_id, model_version, which cannot delete) and `replaceWhere night` (the
present one: the model version's rows of the night replaced in one transaction).
Each round starts from a fresh copy of the built table. Prints, per case, the median wall time and Delta's
operationMetrics of the MERGE commit: target files before/after skipping (what it read), files removed
and added and rows copied (what it rewrote), rows updated/inserted/deleted.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import shutil
import statistics
import time
from pathlib import Path

from pyspark.sql import functions as F

from bertxml.platform import tables as t
from bertxml.config import Config
from bertxml.platform.warehouse import Warehouse, get_spark

MODEL = "bench-v1"
START = dt.date(2024, 1, 1)
METRICS = ("numTargetFilesBeforeSkipping", "numTargetFilesAfterSkipping", "numTargetFilesRemoved",
           "numTargetFilesAdded", "numTargetRowsCopied", "numTargetRowsUpdated", "numTargetRowsInserted",
           "numTargetRowsDeleted", "numTargetBytesRemoved", "scanTimeMs", "rewriteTimeMs", "executionTimeMs")


def predictions_frame(spark, first_id: int, n: int, notes_per_night: int, labels: int, seed: int):
    """Rows of PREDICTIONS_SCHEMA for notes first_id .. first_id+n-1, note i on night i // notes_per_night."""
    codes = F.transform(F.sequence(F.lit(0), F.lit(labels - 1)), lambda i: F.concat(F.lit("C"), i.cast("string")))
    probs = F.transform(F.sequence(F.lit(1), F.lit(labels)),
                        lambda i: (F.abs(F.hash(F.col("id"), i, F.lit(seed))) % 10_000 / 10_000.0).cast("float"))
    df = (spark.range(first_id, first_id + n)
          .select(F.format_string("note-%07d", "id").alias("note_id"),
                  F.format_string("P%05d", (F.col("id") % 5000)).alias("patient_id"),
                  F.date_add(F.lit(START), (F.col("id") / notes_per_night).cast("int")).alias("note_date"),
                  F.lit(MODEL).alias("model_version"), F.lit("bench").alias("run_id"),
                  F.current_timestamp().alias("scored_at"), probs.alias("probabilities"))
          .withColumn("top_codes", F.slice(F.transform(codes, lambda c, i: F.struct(
              c.alias("code"), F.col("probabilities")[i].alias("probability"))), 1, 5))
          .withColumn("predicted_codes", F.slice(codes, 1, 3))
          .withColumn("n_chunks", F.lit(1)).withColumn("truncated", F.lit(False)))
    # probabilities is already array<float> (a cast cannot drop its elements' nullability)
    return df.select(*[F.col(f.name) if f.name == "probabilities" else F.col(f.name).cast(f.dataType)
                       for f in t.PREDICTIONS_SCHEMA.fields])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nights", type=int, default=365)
    parser.add_argument("--notes-per-night", type=int, default=100)
    parser.add_argument("--labels", type=int, default=47)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workdir", default="/tmp/bertxml-bench-merge")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    cfg = Config()
    cfg.spark.shuffle_partitions = 2
    spark = get_spark(cfg, app="bertxml-bench-merge")
    root = Path(args.workdir)
    shutil.rmtree(root, ignore_errors=True)
    n, per = args.nights * args.notes_per_night, args.notes_per_night
    night_index = args.nights * 6 // 10
    night = START + dt.timedelta(days=night_index)
    table = predictions_frame(spark, 0, n, per, args.labels, seed=1)

    built = {}
    started = time.perf_counter()
    templates = root / "templates"
    layouts = {
        "unpartitioned, a file a night": lambda p: table.repartitionByRange(args.nights, "note_date")
        .write.format("delta").save(str(p)),
        "unpartitioned, compacted": lambda p: table.coalesce(1).write.format("delta").save(str(p)),
        "partitioned by note_date": lambda p: table.repartition("note_date").write.format("delta")
        .partitionBy(*t.PREDICTIONS_PARTITIONS).save(str(p)),
    }
    for i, (layout, build) in enumerate(layouts.items()):
        path = templates / f"layout{i}"
        build(path)
        files = spark.read.format("delta").load(str(path)).inputFiles()
        built[layout] = path
        print(f"built {layout}: {n} rows, {len(files)} files", flush=True)
    print(f"built in {time.perf_counter() - started:.0f}s", flush=True)

    # The night rescored: new probabilities, two of its notes gone (now rejected or deleted from the source).
    source = (predictions_frame(spark, night_index * per, per, per, args.labels, seed=2)
              .filter(~F.col("note_id").isin(f"note-{night_index * per:07d}", f"note-{night_index * per + 1:07d}"))
              .localCheckpoint())
    scope = f"model_version = '{MODEL}' AND note_date IN (DATE'{night}')"
    wh = Warehouse(spark, root / "wh", cfg)
    results = []
    for i, (layout, template) in enumerate(built.items()):
        for j, merge in enumerate(("MERGE on keys", "replaceWhere night")):
            walls, metrics = [], None
            for r in range(args.rounds + 1):  # the first round warms up, untimed
                name = f"bench.predictions_{i}_{j}_{r}"  # a path of its own: Delta caches a table's state by path
                target = wh.path(name)
                shutil.copytree(template, target)
                start = time.perf_counter()
                if merge == "MERGE on keys":
                    wh.merge(source, name, ["note_id", "model_version"])
                else:
                    wh.write(source, name, replace_where=scope)
                wall = time.perf_counter() - start
                if r:
                    walls.append(wall)
                history = spark.sql(f"DESCRIBE HISTORY delta.`{target}` LIMIT 1").first()
                metrics = {k: int(v) for k, v in (history.operationMetrics or {}).items()}
                rows = spark.read.format("delta").load(str(target)).filter(F.col("note_date") == night).count()
                shutil.rmtree(target)
            result = {"layout": layout, "merge": merge, "median_s": round(statistics.median(walls), 2),
                      "walls_s": [round(w, 2) for w in walls], "night_rows_after": rows, **metrics}
            results.append(result)
            print(json.dumps(result), flush=True)

    print(f"\nMERGE of one night ({per} notes, 2 of them gone) into {args.nights} nights x {per} notes, "
          f"{args.labels} labels; median of {args.rounds}")
    def get(r, *names):
        return next((r[n] for n in names if n in r), "?")

    print("| layout | write | wall s | files removed / added | rows copied | rows written | rows deleted |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['layout']} | {r['merge']} | {r['median_s']:.2f} "
              f"| {get(r, 'numTargetFilesRemoved', 'numRemovedFiles')} "
              f"/ {get(r, 'numTargetFilesAdded', 'numFiles')} "
              f"| {get(r, 'numTargetRowsCopied', 'numCopiedRows')} "
              f"| {get(r, 'numTargetRowsUpdated', 'numOutputRows')} | {get(r, 'numTargetRowsDeleted', 'numDeletedRows')} |")
    try:
        import torch

        print("CPU capability:", torch.backends.cpu.get_cpu_capability())
    except Exception:  # noqa: BLE001 - a figure's context only
        pass
    spark.stop()


if __name__ == "__main__":
    main()
