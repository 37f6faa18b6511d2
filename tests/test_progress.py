"""Tests for bertxml/platform/progress.py: a job's running Spark stages are logged while it runs.

Run: .venv/bin/python -m pytest -q tests/test_progress.py
"""
import re
import time

from bertxml.platform.progress import elapsed_text
from bertxml.platform.runs import job_run

PROGRESS = "bertxml.platform.progress"


def progress_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == PROGRESS]


def sleeping(seconds: float):
    """A mapInPandas body that sleeps `seconds` a partition (a closure: pickled by value for the workers)."""
    def body(frames):
        for frame in frames:
            time.sleep(seconds)
            yield frame
    return body


def test_job_run_logs_its_running_stage_then_stops(wh, caplog):
    wh.cfg.spark.progress_seconds = 1
    with job_run(wh, "slow-job"):
        rows = wh.spark.range(0, 4, numPartitions=4).mapInPandas(sleeping(1.5), schema="id long").count()
    assert rows == 4
    lines = progress_lines(caplog)
    assert len(lines) >= 2, lines   # 4 tasks of 1.5 s on 2 cores, a line a second
    assert all(re.fullmatch(r"slow-job running for \d+s: stage \d+: \d/\d tasks done, \d running", line)
               for line in lines), lines
    assert any("/4 tasks done" in line for line in lines), lines   # the mapInPandas stage: 4 partitions
    time.sleep(2.5)
    assert len(progress_lines(caplog)) == len(lines)   # the thread ended with the job


def test_progress_off_logs_nothing(wh, caplog):
    wh.cfg.spark.progress_seconds = 0
    with job_run(wh, "quiet-job"):
        wh.spark.range(0, 2, numPartitions=2).mapInPandas(sleeping(1.5), schema="id long").count()
    assert progress_lines(caplog) == []


def test_elapsed_text():
    assert [elapsed_text(s) for s in (5, 65, 3725.9)] == ["5s", "1m05s", "1h02m05s"]
