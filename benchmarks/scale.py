"""The paper's scale on one machine: generate, ETL, vocabulary, tokenisation and nightly scoring at N notes,
with wall time, notes/s, the scoring engine's MFU and peak memory of every process (figures, not a test).

    .venv/bin/python benchmarks/scale.py --notes 1000000 [--night-tiny 20000] [--night-small 2000]
                                         [--workdir /tmp/scale] [--stages generate,copy,etl,vocab,tokenize,score]
                                         [--vocab-notes 200000] [--keep] [--resume]

One warehouse of N generated notes (the paper's ETL covered 7.5M) under WORKDIR/n<N>, each stage the library
call its `bertxml` command makes, in one local Spark session (`conf/local.yaml`'s defaults: local[*], a 6g
driver, which is also the only executor):

1. generate: `run_generate` (Spark tasks over patient indices write `ehr.notes` and `ehr.diagnoses`);
2. copy: a plain Spark read and Delta write of the notes table (`bench.notes_copy`), the yardstick for the
   ETL (target: ETL within 3x a copy). Run once before the ETL and once after it; the faster is the yardstick;
3. etl: `run_etl`; 4. vocab: `run_vocab` (word counts in Spark, the WordPiece trainer on the driver;
   `--vocab-notes` sets `vocab.max_notes`, a patient sample of about that many train notes);
5. tokenize: `run_tokenize` at 512 tokens (target: within 2x the ETL);
6. score: two nights through the nightly job (`run_score --date D --notes bench.nights`): `--night-tiny`
   labeled notes with the demo's model size (tiny) and `--night-small` with the paper's `small`.
   `--tiny-model DIR` scores the tiny night with a trained folder instead (the demo's model). The
   nights are drawn from labeled_notes by a hash of the note id and re-dated (a generated night holds
   about N / 1,100 notes, not 20,000), in Spark. The models are random-init `BertForIcdCoding` folders
   of the preset size, with this warehouse's vocabulary and label vocabulary: the arithmetic of a
   trained model, without training one. Their probabilities are not a trained model's: whether a code
   passes the default 0.5 threshold is left to the init, and the evidence rows (`score.evidence`, one set
   per predicted code) cost with it (benchmarks/README.md "Scale" says what each run got). MFU: the model
   FLOPs of the night's real tokens (the night's notes chunked by the tokenize job's code, as the scorer
   chunks them) over the job's scoring action, against `benchmarks/machine.py`'s matmul peak in the dtype
   the job runs (target for `small`: >= 50%).

A sampler thread reads /proc (psutil) every half second: the peak resident memory of this Python driver,
of the Spark JVM it started, and of all PySpark Python workers together, per stage. After each stage the
disk used by the warehouse's tables and by Spark's local directory is measured (du). Nothing in this
script or the jobs it calls brings note text to the driver (the vocabulary's OOV report reads a fixed
`vocab.oov_notes` dev notes, whatever N).

Run one size per process (the JVM's resident memory never shrinks): compare the printed rows of two runs
to see whether memory stays flat as N grows. `--keep` leaves the warehouse; `--resume` runs more stages on
it in a new process (a stage needs the tables of the stages before it). Figures and history:
benchmarks/README.md ("Scale").
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import torch
from machine import DTYPES, describe_machine, matmul_peak, precisions_to_time
from score import flops_from_sums

from bertxml.config import Config, ModelConfig
from bertxml.config_io import model_preset
from bertxml.etl.etl import run_etl
from bertxml.etl.generate import run_generate
from bertxml.text.tokenize import run_tokenize
from bertxml.text.vocab import run_vocab
from bertxml.platform.warehouse import Warehouse, get_spark

STAGES = ("generate", "copy", "etl", "vocab", "tokenize", "score")
NIGHT_TINY, NIGHT_SMALL = dt.date(2026, 1, 5), dt.date(2026, 1, 6)   # after every generated note's date
MAX_LEN = 512
GIB = 1024 ** 3


# ---- memory: the process tree, sampled ---------------------------------------------------------------------
class MemorySampler:
    """Peak RSS of the Python driver (this process), the JVM(s) it started and the PySpark Python workers
    (summed over the processes alive at one sample), since the last `reset`."""

    def __init__(self, interval: float = 0.5):
        self.me = psutil.Process()
        self.interval = interval
        self.peaks = {"driver_py": 0, "jvm": 0, "workers": 0, "n_workers": 0}
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def sample(self) -> dict:
        now = {"driver_py": self.me.memory_info().rss, "jvm": 0, "workers": 0, "n_workers": 0}
        for p in self.me.children(recursive=True):
            try:
                name, rss = p.name(), p.memory_info().rss
            except psutil.Error:
                continue
            if name == "java":
                now["jvm"] += rss
            elif name.startswith("python"):
                now["workers"] += rss
                now["n_workers"] += 1
        return now

    def _run(self) -> None:
        while not self.stop.wait(self.interval):
            now = self.sample()
            with self.lock:
                for k, v in now.items():
                    self.peaks[k] = max(self.peaks[k], v)

    def reset(self) -> dict:
        """The peaks since the last reset, and start over."""
        now = self.sample()
        with self.lock:
            out = {k: max(v, now[k]) for k, v in self.peaks.items()}
            self.peaks = dict(now)
        return out


def du(path: Path) -> int:
    if not path.exists():
        return 0
    out = subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True).stdout.split()
    return int(out[0]) if out else 0


# ---- the nights and the models -----------------------------------------------------------------------------
def write_nights(wh, n_tiny: int, n_small: int, total_kept: int) -> dict:
    """bench.nights, in the notes schema: n_tiny labeled notes dated NIGHT_TINY and n_small more dated
    NIGHT_SMALL, drawn by a hash of the note id (about 10% more than needed pass the hash; a window over
    those few orders them). All in Spark; the driver gets counts."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    from bertxml.platform import tables as t

    need = n_tiny + n_small
    if need > total_kept:
        raise SystemExit(f"the nights need {need} labeled notes; the warehouse has {total_kept}")
    per_mille = min(1000, int(1000 * need * 1.1 / total_kept) + 1)
    h = F.pmod(F.xxhash64("note_id"), F.lit(1000))
    picked = (wh.table(wh.name("labeled_notes")).filter(h < per_mille)
              .withColumn("_rank", F.row_number().over(Window.orderBy(F.xxhash64("note_id", F.lit("night")))))
              .filter(F.col("_rank") <= need))
    nights = picked.select(
        "note_id", "patient_id", "encounter_id",
        F.when(F.col("_rank") <= n_tiny, F.lit(NIGHT_TINY)).otherwise(F.lit(NIGHT_SMALL)).alias("note_date"),
        F.lit("progress_note").alias("note_type"), F.lit("physician").alias("author_role"),
        F.lit("final").alias("status"), "text")
    nights = nights.select([F.col(f.name).cast(f.dataType) for f in t.NOTES_SCHEMA.fields])
    wh.write(nights.repartition(8), "bench.nights")
    counts = {r[0]: r[1] for r in wh.table("bench.nights").groupBy("note_date").count().collect()}
    return {NIGHT_TINY: counts.get(NIGHT_TINY, 0), NIGHT_SMALL: counts.get(NIGHT_SMALL, 0)}


def build_model(wh, root: Path, size: str) -> tuple[Path, object, int]:
    """A random-init BertForIcdCoding of the preset `size` with this warehouse's tokenizer and label
    vocabulary, as a complete model folder. Returns (folder, BertConfig, number of labels)."""
    from tokenizers import Tokenizer

    from bertxml.models.bert import BertForIcdCoding, bert_config, save_model
    from bertxml.models.modeldir import write_model_dir

    tok_file = wh.workdir / "vocab" / "tokenizer.json"
    tokenizer = Tokenizer.from_file(str(tok_file))
    labels = [r.asDict() for r in wh.table(wh.name("label_vocab")).orderBy("label_index").collect()]
    fields = {k: v for k, v in model_preset(size).items() if k in ModelConfig.__dataclass_fields__}
    mcfg = ModelConfig(**{**fields, "max_len": MAX_LEN})
    torch.manual_seed(0)
    model = BertForIcdCoding(bert_config(mcfg, tokenizer.get_vocab_size()), len(labels), "bertxml")
    out = root / f"scale-{size}"
    shutil.rmtree(out, ignore_errors=True)
    save_model(model, out)
    write_model_dir(out, model_version=f"scale-{size}", model_kind="bertxml", config={}, inputs={},
                    max_len=MAX_LEN, dev_metrics={}, parameters=sum(p.numel() for p in model.parameters()),
                    train_seconds=0.0, tokenizer_file=tok_file, label_vocab=labels, thresholds={})
    return out, model.config, len(labels)


def trained_model(model_dir: Path) -> tuple[Path, object, int]:
    """A trained model folder (`--tiny-model`): (folder, its BertConfig, its number of labels), read from its
    config file without loading the weights."""
    from transformers import BertConfig

    from bertxml.models.bert import CONFIG_FILE

    meta = json.loads((model_dir / CONFIG_FILE).read_text())
    return model_dir, BertConfig.from_dict(meta["bert_config"]), int(meta["n_labels"])


def night_tokens(wh, night: dt.date, model_dir: Path) -> dict:
    """Chunks, real tokens and the sum of squared chunk lengths of a night's notes, chunked in Spark by
    `chunk_notes_df` with the model folder's tokenizer and max_len (the scorer's chunking): aggregates only,
    and no need of a tokenize stage over the whole warehouse."""
    from pyspark.sql import functions as F

    from bertxml.text.tokenize import chunk_notes_df

    notes = (wh.table("bench.nights").filter(F.col("note_date") == F.lit(night))
             .select("note_id", F.lit("night").alias("split"), "text", F.array().cast("array<string>").alias("codes")))
    from bertxml.models.modeldir import load_manifest

    tokenizer_json = (model_dir / "tokenizer.json").read_text(encoding="utf-8")
    chunks = chunk_notes_df(notes, tokenizer_json, {}, int(load_manifest(model_dir)["max_len"]))
    n = F.size("input_ids").cast("double")
    row = chunks.agg(F.count("*").alias("chunks"), F.sum(n).alias("tokens"), F.sum(n * n).alias("tokens_sq")).first()
    return {"chunks": int(row["chunks"]), "tokens": float(row["tokens"] or 0),
            "tokens_sq": float(row["tokens_sq"] or 0)}


# ---- the run -----------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--notes", type=int, default=1_000_000)
    parser.add_argument("--night-tiny", type=int, default=20_000, help="notes of the night scored with tiny")
    parser.add_argument("--night-small", type=int, default=2_000, help="notes of the night scored with small")
    parser.add_argument("--workdir", default="/tmp/scale")
    parser.add_argument("--stages", default=",".join(STAGES),
                        help="comma-separated subset of " + ",".join(STAGES) + " (in that order)")
    parser.add_argument("--keep", action="store_true", help="keep the warehouse")
    parser.add_argument("--resume", action="store_true",
                        help="run the stages on the warehouse a --keep run left in WORKDIR/n<N> (a later stage "
                             "in a process of its own)")
    parser.add_argument("--tiny-model", default=None,
                        help="score the tiny night with this trained model folder (e.g. the demo's, "
                             "warehouse/models/<version>) instead of a random-init tiny model")
    parser.add_argument("--vocab-notes", type=int, default=0,
                        help="vocab.max_notes: the vocabulary reads a patient sample of about this many train "
                             "notes (0: all)")
    parser.add_argument("--driver-memory", default="6g")
    args = parser.parse_args()
    stages = [s for s in args.stages.split(",") if s]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        parser.error(f"unknown stages {unknown}; choose from {','.join(STAGES)}")
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)

    root = Path(args.workdir) / f"n{args.notes}"
    if args.resume and not (root / "tables").is_dir():
        parser.error(f"--resume: no warehouse in {root}")
    if not args.resume:
        shutil.rmtree(root, ignore_errors=True)
    local_dir = root / "spark-local"
    local_dir.mkdir(parents=True, exist_ok=True)
    cfg = Config()
    cfg.spark.driver_memory = args.driver_memory
    cfg.spark.conf = {**cfg.spark.conf, "spark.local.dir": str(local_dir)}
    cfg.generate.notes = args.notes
    cfg.generate.partitions = max(8, args.notes // 25_000)       # as benchmarks/etl.py
    cfg.vocab.max_notes = args.vocab_notes
    torch.set_num_threads(os.cpu_count())

    print(describe_machine())
    print(f"notes {args.notes:,}; nights {args.night_tiny:,} (tiny) and {args.night_small:,} (small); "
          f"vocab.max_notes {args.vocab_notes:,}; driver memory {cfg.spark.driver_memory}; workdir {root}"
          f"{' (resumed)' if args.resume else ''}; load average {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} CPUs", flush=True)
    sampler = MemorySampler()
    spark = get_spark(cfg, app="bertxml-bench-scale")
    wh = Warehouse(spark, root, cfg)
    rows, facts = [], {}
    sampler.reset()

    def stage(name: str, fn, notes_of=None) -> dict:
        load = os.getloadavg()[0]
        started = time.perf_counter()
        result = fn() or {}
        seconds = time.perf_counter() - started
        peaks = sampler.reset()
        n = notes_of(result) if notes_of else None
        disk = {"tables": du(root / "tables"), "spark_local": du(local_dir)}
        row = {"stage": name, "seconds": seconds, "notes": n, "notes_per_s": n / seconds if n else None,
               **peaks, **{f"disk_{k}": v for k, v in disk.items()}, "load": load, **result.get("_extra", {})}
        rows.append(row)
        print(f"[{name}] {seconds:.1f}s" + (f", {n:,} notes, {n / seconds:,.0f} notes/s" if n else "")
              + f"; peak RSS driver JVM {peaks['jvm'] / GIB:.2f} GiB, Python driver {peaks['driver_py'] / GIB:.2f}"
              f" GiB, Python workers {peaks['workers'] / GIB:.2f} GiB (at most {peaks['n_workers']} processes); "
              f"tables {disk['tables'] / GIB:.2f} GiB, Spark local {disk['spark_local'] / GIB:.2f} GiB; "
              f"load {load:.1f}", flush=True)
        return result

    if "generate" in stages:
        res = stage("generate", lambda: run_generate(wh, cfg.generate), lambda r: r["notes"])
        facts["note_rows"], facts["diagnosis_rows"] = res["notes"], res["diagnoses"]
        facts["notes_disk"] = du(wh.path(cfg.warehouse.notes))
        print(f"  ehr.notes {res['notes']:,} rows ({facts['notes_disk'] / GIB:.2f} GiB), ehr.diagnoses "
              f"{res['diagnoses']:,} rows, {res['patients']:,} patients", flush=True)
    note_rows = facts.get("note_rows") or wh.table(cfg.warehouse.notes).count()

    def copy():
        wh.write(wh.table(cfg.warehouse.notes), "bench.notes_copy")
        return {"notes": note_rows}

    if "copy" in stages:
        stage("copy", copy, lambda r: r["notes"])
    if "etl" in stages:
        res = stage("etl", lambda: run_etl(wh, cfg), lambda r: note_rows)
        facts["labeled_notes"] = res["labeled_notes"]
        print(f"  labeled_notes {res['labeled_notes']:,} ({res['labeled_notes_by_split']}), "
              f"{res['label_vocab_codes']} label codes, {res['rejects']:,} rejects", flush=True)
        if "copy" in stages:
            stage("copy (again)", copy, lambda r: r["notes"])
    labeled = facts.get("labeled_notes") or wh.table(wh.name("labeled_notes")).count()
    if "vocab" in stages:
        res = stage("vocab", lambda: run_vocab(wh, cfg), lambda r: r["texts"])
        print(f"  vocabulary {res['vocab_size']:,} pieces from {res['texts']:,} train notes "
              f"({res['patient_share']:.1%} of train patients) "
              f"({res['distinct_words']:,} distinct words, {res['words_trained_on']:,} trained on)", flush=True)
    if "tokenize" in stages:
        res = stage("tokenize", lambda: run_tokenize(wh, cfg, max_len=MAX_LEN), lambda r: r["notes"])
        print(f"  {res['chunks']:,} chunks of <= {MAX_LEN} tokens ({res['chunks_per_note']} a note, "
              f"{res['notes_over_max_len']:,} notes over {MAX_LEN})", flush=True)

    if "score" in stages:
        from bertxml.scoring.score import run_score

        stage("nights", lambda: {"_extra": {}, **{str(k): v for k, v in write_nights(
            wh, args.night_tiny, args.night_small, labeled).items()}}, lambda r: sum(
            v for k, v in r.items() if not k.startswith("_")))
        dtype_name = precisions_to_time("cpu", "auto")[0]
        for size, night, n_night in (("tiny", NIGHT_TINY, args.night_tiny), ("small", NIGHT_SMALL, args.night_small)):
            if not n_night:
                continue
            if size == "tiny" and args.tiny_model:
                model_dir, bcfg, n_labels = trained_model(Path(args.tiny_model).resolve())
            else:
                model_dir, bcfg, n_labels = build_model(wh, root / "models", size)
            tok = night_tokens(wh, night, model_dir)
            flops = flops_from_sums(tok["tokens"], tok["tokens_sq"], tok["chunks"], bcfg, n_labels)
            peak = max(matmul_peak(DTYPES[dtype_name], seconds=2.0)[0] for _ in range(2))
            res = stage(f"score {size}", lambda: run_score(wh, cfg, date=night, model_dir=model_dir,
                                                           notes_source="bench.nights"),
                        lambda r: r["notes_scored"])
            secs = res["scoring_seconds"]
            mfu_action = flops / secs / peak if secs else float("nan")
            mfu_job = flops / rows[-1]["seconds"] / peak
            rows[-1].update({"mfu_action": mfu_action, "mfu_job": mfu_job, "scoring_seconds": secs,
                             "peak_gflops": peak / 1e9, "model_gflop": flops / 1e9, "chunks": tok["chunks"],
                             "tokens": tok["tokens"], "labels": n_labels})
            night_minutes = 20_000 / res['notes_scored'] * rows[-1]['seconds'] / 60
            print(f"  model {size} ({model_dir.name}, {n_labels} codes, {dtype_name}): "
                  f"{res['notes_scored']:,} notes scored, {tok['chunks']:,} chunks, {tok['tokens'] / 1e6:.2f}M real "
                  f"tokens, {flops / 1e12:.2f} TFLOP; "
                  f"the scoring action {secs:.1f}s ({res['notes_per_s']} notes/s); matmul peak {dtype_name} "
                  f"{peak / 1e9:.0f} GFLOP/s; MFU {mfu_action:.1%} over the scoring action, {mfu_job:.1%} over "
                  f"the whole job; a 20,000-note night at this rate: {night_minutes:.1f} min",
                  flush=True)

    spark.stop()
    time.sleep(1)
    sampler.stop.set()
    print(f"\nSUMMARY notes={args.notes} rows={note_rows} labeled={labeled}")
    print(f"{'stage':14s} {'seconds':>8s} {'notes/s':>9s} {'JVM GiB':>8s} {'py drv':>7s} {'workers':>8s} "
          f"{'tables GiB':>10s} {'local GiB':>9s} {'load':>5s} {'MFU':>6s}")
    for r in rows:
        mfu = f"{r['mfu_action']:6.1%}" if "mfu_action" in r else ""
        nps = f"{r['notes_per_s']:9,.0f}" if r["notes_per_s"] else " " * 9
        print(f"{r['stage']:14s} {r['seconds']:8.1f} {nps} {r['jvm'] / GIB:8.2f} {r['driver_py'] / GIB:7.2f} "
              f"{r['workers'] / GIB:8.2f} {r['disk_tables'] / GIB:10.2f} {r['disk_spark_local'] / GIB:9.2f} "
              f"{r['load']:5.1f} {mfu}")
    by = {r["stage"]: r["seconds"] for r in rows}
    copies = [by[k] for k in ("copy", "copy (again)") if k in by]
    if copies and "etl" in by:
        print(f"ETL / copy: {by['etl'] / min(copies):.2f} (copy {min(copies):.1f}s, the faster of {len(copies)}; "
              "target <= 3)")
    if "etl" in by and "tokenize" in by:
        print(f"tokenize / ETL: {by['tokenize'] / by['etl']:.2f} (target <= 2)")
    print("JSON " + json.dumps({"notes": args.notes, "rows": rows}, default=str))
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
