"""Job runs: a run id, timing, lineage and counts for every job, logged and kept in `bertxml.job_runs`.

    with job_run(wh, "etl") as run:
        run.inputs["ehr.notes"] = 3
        run.count("notes_read", n)
        run.outputs["bertxml.labeled_notes"] = wh.write(...)

A failed job is recorded too (status 'failed: <error>') and the error re-raised for the exit status.
`find_run` reads a recorded run back (`bertxml etl --as-of-run` replays what an ETL run read).
"""
from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import uuid
from dataclasses import dataclass, field

from pyspark.sql import functions as F

from bertxml.platform import tables as t
from bertxml.platform.progress import SparkProgress
from bertxml.platform.warehouse import local_frame

log = logging.getLogger("bertxml.platform.runs")


def new_run_id(job: str) -> str:
    return f"{job}-{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"


@dataclass
class JobRun:
    job: str
    run_id: str
    started_at: dt.datetime
    inputs: dict = field(default_factory=dict)
    outputs: dict = field(default_factory=dict)
    counts: dict = field(default_factory=dict)

    def count(self, name: str, value) -> None:
        self.counts[name] = value
        log.info("%s: %s = %s", self.job, name, value)


@contextlib.contextmanager
def job_run(wh, job: str, cfg=None):
    """Time a job, log its summary and append one row to bertxml.job_runs (even when it fails). The row's
    config is `cfg`'s, when the job runs with another than the warehouse's (`wh.cfg`). While it runs, its
    Spark stages' task counts are logged every `spark.progress_seconds` (`SparkProgress`)."""
    run = JobRun(job=job, run_id=new_run_id(job), started_at=dt.datetime.now(dt.timezone.utc))
    log.info("%s started (run %s, warehouse %s)", job, run.run_id, wh.workdir)
    status = "succeeded"
    try:
        with SparkProgress(wh.spark, job, (cfg or wh.cfg).spark.progress_seconds):
            yield run
    except BaseException as exc:
        status = f"failed: {type(exc).__name__}: {exc}"[:500]
        raise
    finally:
        finished = dt.datetime.now(dt.timezone.utc)
        row = [(run.run_id, job, run.started_at.replace(tzinfo=None), finished.replace(tzinfo=None), status,
                json.dumps(run.inputs, default=str), json.dumps(run.outputs, default=str),
                json.dumps(run.counts, default=str), json.dumps((cfg or wh.cfg).to_dict(), default=str))]
        try:
            wh.write(local_frame(wh.spark, row, t.JOB_RUNS_SCHEMA), wh.name(t.JOB_RUNS), mode="append")
        except Exception as exc:  # noqa: BLE001 - never hide the job's own error behind the log's
            log.warning("could not record the run in %s: %s", wh.name(t.JOB_RUNS), exc)
        log.info("%s %s in %.1fs; read %s; wrote %s", job, status, (finished - run.started_at).total_seconds(),
                 run.inputs or "-", run.outputs or "-")


def find_run(wh, run_id: str) -> dict | None:
    """The bertxml.job_runs row of `run_id` as a dict, its JSON columns (inputs, outputs, counts, config)
    parsed; None when the warehouse has no such run."""
    name = wh.name(t.JOB_RUNS)
    if not wh.exists(name):
        return None
    rows = wh.table(name).filter(F.col("run_id") == run_id).collect()
    if not rows:
        return None
    row = rows[-1].asDict()
    for key in ("inputs", "outputs", "counts", "config"):
        row[key] = json.loads(row[key]) if row[key] else {}
    return row
