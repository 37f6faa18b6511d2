"""A job killed anywhere, then rerun, leaves every table as one clean run would (README "Reruns").

Each case copies a prepared warehouse, runs the job as a subprocess in its own session with BERTXML_FAULT set
(`bertxml/platform/faults.py`: the job SIGKILLs its whole session, JVM and Python workers included, at that point),
checks that it died there, reruns the job without the fault, and compares the tables with those of a clean
run on another copy: the same rows, counted (no duplicate), the same probabilities. For the score job the
clean run is the rerun of the copy whose job was killed before its first write (checked: every table of that
copy holds the base's commits and no other), so two killed jobs need no third run.

Run: .venv/bin/python -m pytest -q tests/test_faults.py
"""
import datetime as dt
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bertxml.platform import tables as t
from bertxml.config import Config
from bertxml.platform.faults import committed_versions
from bertxml.platform.warehouse import Warehouse
from test_score import SENTENCES, make_model_dir, note

REPO = Path(__file__).resolve().parent.parent
NIGHT = dt.date(2025, 3, 1)
# The job's settings, the same in the killed subprocess and in the in-process runs it is compared with.
SETTINGS = {"spark.shuffle_partitions": "2", "score.partitions": "1", "score.cpu_bf16": "false",
            "score.arrow_batch_notes": "4", "etl.min_code_count": "0"}


def job_cfg() -> Config:
    cfg = Config()
    for key, value in SETTINGS.items():
        section, name = key.split(".", 1)
        field = getattr(getattr(cfg, section), name)
        setattr(getattr(cfg, section), name, type(field)(value) if not isinstance(field, str) else value)
    return cfg


def start_killed(fault: str, workdir: Path, *args: str):
    """Start `bertxml ARGS` on workdir with BERTXML_FAULT=fault, in a session of its own; `wait_killed` checks
    that the fault killed it. The test runs its in-process work meanwhile."""
    env = {**os.environ, "BERTXML_FAULT": fault, "PYTHONPATH": str(REPO), "PYSPARK_PYTHON": sys.executable}
    sets = [x for key, value in {**SETTINGS, "spark.master": "local[2]", "spark.driver_memory": "1g"}.items()
            for x in ("--set", f"{key}={value}")]
    log = open(workdir.parent / f"{workdir.name}.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "bertxml.cli", *args, "--workdir", str(workdir), *sets],
                            env=env, cwd=REPO, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
    return fault, proc, log, time.perf_counter()


def wait_killed(started) -> None:
    fault, proc, log, t0 = started
    code = proc.wait(timeout=300)
    log.seek(0)
    output = log.read()
    log.close()
    assert code == -signal.SIGKILL, f"{fault}: the job was not killed (exit {code}):\n{output[-3000:]}"
    print(f"{fault}: killed after {time.perf_counter() - t0:.1f}s")


def rows(spark, workdir: Path, table: str, where: str = "true",
         drop=("run_id", "scored_at", "rejected_at", "updated_at")):
    """A table's rows, without the columns that name the run, sorted; every row kept (duplicates count)."""
    df = spark.read.format("delta").load(str(workdir / "tables" / "bertxml" / table)).filter(where)
    df = df.drop(*[c for c in drop if c in df.columns])
    return df.columns, sorted((tuple(r) for r in df.collect()), key=lambda r: tuple(map(str, r)))


def assert_killed_mid_commit(base: Path, work: Path, table: str, committed: list[str]) -> None:
    """The kill came after `committed` tables' commits and between `table`'s data files and its commit."""
    before, after = base / "tables" / "bertxml" / table, work / "tables" / "bertxml" / table
    assert committed_versions(after) == committed_versions(before), f"{table}: the commit landed before the kill"
    assert len(list(after.rglob("*.parquet"))) > len(list(before.rglob("*.parquet"))), f"{table}: no data file"
    for name in committed:
        folder = Path("tables") / "bertxml" / name
        assert committed_versions(work / folder) > committed_versions(base / folder), f"{name}: not committed"


def table_versions(workdir: Path) -> dict[str, list[int]]:
    """{schema/table: committed Delta versions} of every table folder under workdir, committed or not."""
    root = workdir / "tables"
    return {str(p.relative_to(root)): committed_versions(p) for p in sorted(root.glob("*/*")) if p.is_dir()}


def table_files(workdir: Path) -> dict[str, int]:
    """{path under tables/: size} of every file in workdir's tables."""
    root = workdir / "tables"
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}


def assert_same_tables(spark, got: Path, clean: Path, tables: dict) -> None:
    for table, where in tables.items():
        cols, a = rows(spark, got, table, where)
        _, b = rows(spark, clean, table, where)
        assert len(a) == len(b), f"{table}: {len(a)} rows after the kill and rerun, {len(b)} after a clean run"
        for x, y in zip(a, b):
            for name, u, v in zip(cols, x, y):
                if name == "probabilities":
                    np.testing.assert_allclose(u, v, atol=1e-6, err_msg=f"{table}.{name}")
                elif name == "top_codes":
                    assert [c.code for c in u] == [c.code for c in v], f"{table}.{name}"
                else:
                    assert u == v, f"{table}.{name}: {u!r} != {v!r}"
    runs = {}
    for workdir in (got, clean):  # the killed run left no row; the rerun its own: as many as a clean run's
        _, r = rows(spark, workdir, t.JOB_RUNS, drop=())
        runs[workdir] = sorted((x[1], x[4]) for x in r)
    assert runs[got] == runs[clean]


# ---- score ------------------------------------------------------------------------------------------------
def night_notes(changed: bool):
    """About 30 notes of one night, a few of them rejected; `changed`: the feed as it stands at the rerun
    (n03 now erroneous, n07 deleted, n30 new), so the rerun has old rows to delete."""
    rows_ = [note(f"n{i:02d}", NIGHT, SENTENCES[i % 8] + " " + SENTENCES[(3 * i + 1) % 8], patient=f"P{i % 7}")
             for i in range(26)]
    rows_ += [note("short", NIGHT, "bp ok"), note("err", NIGHT, SENTENCES[2], status="erroneous"),
              note("other", NIGHT + dt.timedelta(days=1), SENTENCES[4] + " " + SENTENCES[5])]
    if changed:
        rows_ = [r for r in rows_ if r[0] != "n07"]
        rows_ = [note("n03", NIGHT, r[-1], status="erroneous") if r[0] == "n03" else r for r in rows_]
        rows_.append(note("n30", NIGHT, SENTENCES[6] + " " + SENTENCES[1]))
    return rows_


def test_score_killed_anywhere_then_rerun_equals_a_clean_run(spark, tmp_path):
    from bertxml.scoring.score import run_score

    cfg = job_cfg()
    model = make_model_dir(tmp_path / "models")
    base = tmp_path / "base"
    wh = Warehouse(spark, base, cfg)
    wh.write(spark.createDataFrame(night_notes(changed=False), t.NOTES_SCHEMA), "ehr.notes")
    run_score(wh, cfg, date=NIGHT, model_dir=model)   # last night's run, before the feed changed
    wh.write(spark.createDataFrame(night_notes(changed=True), t.NOTES_SCHEMA), "ehr.notes")
    # Killed while the model runs (nothing written yet); and with the predictions MERGE committed and the
    # rejects write killed between writing its data files and committing them (between two writes, during a
    # commit). The two killed jobs run side by side.
    faults = ("score:udf", "commit:bertxml.rejects")
    work = {fault: tmp_path / fault.replace(":", "-") for fault in faults}
    started = []
    for fault in faults:
        shutil.copytree(base, work[fault])
        started.append(start_killed(fault, work[fault], "score", "--date", NIGHT.isoformat(), "--model", str(model)))
    for job in started:
        wait_killed(job)
    # The kill while the model ran wrote nothing under tables/ (no commit, not even a data file; job_runs
    # included): the warehouse it left is the base warehouse, so its rerun is a clean run, the one the other
    # rerun must equal.
    assert table_versions(work["score:udf"]) == table_versions(base)
    assert table_files(work["score:udf"]) == table_files(base)
    assert_killed_mid_commit(base, work["commit:bertxml.rejects"], t.REJECTS,
                             committed=[t.PREDICTIONS, t.ENCOUNTER_PREDICTIONS])
    for fault in faults:
        run_score(Warehouse(spark, work[fault], cfg), cfg, date=NIGHT, model_dir=model)
    clean = work["score:udf"]
    assert_same_tables(spark, work["commit:bertxml.rejects"], clean,
                       {t.PREDICTIONS: "true", t.ENCOUNTER_PREDICTIONS: "true", t.REJECTS: "job = 'score'",
                        t.MODEL_LABELS: "true"})
    for workdir in work.values():  # last night's run and the rerun; no row of a killed run
        _, runs = rows(spark, workdir, t.JOB_RUNS, drop=())
        assert sorted((r[1], r[4]) for r in runs) == [("score", "succeeded")] * 2, runs
    _, predicted = rows(spark, clean, t.PREDICTIONS)
    assert sorted(r[0] for r in predicted) == sorted({f"n{i:02d}" for i in range(26)} - {"n03", "n07"} | {"n30"})


# ---- etl --------------------------------------------------------------------------------------------------
def test_etl_killed_then_rerun_equals_a_clean_run(spark, tmp_path):
    from bertxml.config import GenerateConfig
    from bertxml.etl.etl import run_etl
    from bertxml.etl.generate import run_generate

    cfg = job_cfg()
    base = tmp_path / "base"
    run_generate(Warehouse(spark, base, cfg), GenerateConfig(notes=40, partitions=1, seed=3))
    # labeled_notes committed; label_vocab killed between writing its data files and committing them. The
    # first ETL: the killed write creates its table, so the rerun finds a log folder with no commit.
    work = tmp_path / "killed"
    shutil.copytree(base, work)
    job = start_killed("commit:bertxml.label_vocab", work, "etl")
    shutil.copytree(base, tmp_path / "clean")
    run_etl(Warehouse(spark, tmp_path / "clean", cfg), cfg)
    wait_killed(job)
    assert_killed_mid_commit(base, work, t.LABEL_VOCAB, committed=[t.LABELED_NOTES])
    run_etl(Warehouse(spark, work, cfg), cfg)
    assert_same_tables(spark, work, tmp_path / "clean",
                       {t.LABELED_NOTES: "true", t.LABEL_VOCAB: "true", t.REJECTS: "job = 'etl'"})
    _, labeled = rows(spark, work, t.LABELED_NOTES)
    assert len(labeled) > 20
