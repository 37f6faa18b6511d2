"""Progress of a job's Spark work, in its log while it runs.

Spark's console progress bar is off in this project's sessions, and so is the web UI in local mode
(`get_spark`), so a long job (tokenising millions of notes takes hours on a small machine) would otherwise be
silent until it ends.
`SparkProgress` is a daemon thread that reads the SparkContext's status tracker every
`spark.progress_seconds` and logs, for each running Spark stage, its tasks done, running and in all:

    tokenize running for 41m00s: stage 12: 187/448 tasks done, 2 running

Counts only, never data. `bertxml.platform.runs.job_run` starts one for every job; a job with no running
stage logs nothing. 0 turns it off.
"""
from __future__ import annotations

import logging
import threading
import time

log = logging.getLogger("bertxml.platform.progress")


def running_stages(tracker) -> list[tuple[int, int, int, int]]:
    """(stage id, tasks done, tasks running, tasks in all) of each active stage, by stage id."""
    stages = []
    for stage_id in sorted(tracker.getActiveStageIds()):
        info = tracker.getStageInfo(stage_id)
        if info is not None:  # the stage may end between the two calls
            stages.append((stage_id, info.numCompletedTasks, info.numActiveTasks, info.numTasks))
    return stages


def elapsed_text(seconds: float) -> str:
    """3725.0 -> '1h02m05s'; 65.0 -> '1m05s'; 5.0 -> '5s'."""
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class SparkProgress:
    """A context manager: while inside, log the running Spark stages of `spark` every `every_s` seconds
    under the name `job`."""

    def __init__(self, spark, job: str, every_s: int):
        self.spark, self.job, self.every_s = spark, job, int(every_s)
        self._stop = threading.Event()
        self._thread = None
        self._started = time.monotonic()

    def __enter__(self) -> "SparkProgress":
        if self.every_s > 0:
            self._thread = threading.Thread(target=self._run, name=f"bertxml-progress-{self.job}", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _run(self) -> None:
        try:
            tracker = self.spark.sparkContext.statusTracker()
        except Exception as exc:  # noqa: BLE001 - a Spark Connect session has no SparkContext: no progress
            log.info("%s: no Spark progress lines (%s)", self.job, type(exc).__name__)
            return
        while not self._stop.wait(self.every_s):
            try:
                stages = running_stages(tracker)
            except Exception as exc:  # noqa: BLE001 - a progress line must never fail the job
                log.debug("no progress from Spark: %s", exc)
                continue
            if stages:
                log.info("%s running for %s: %s", self.job, elapsed_text(time.monotonic() - self._started),
                         "; ".join(f"stage {sid}: {done}/{total} tasks done, {active} running"
                                   for sid, done, active, total in stages))
