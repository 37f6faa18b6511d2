"""Fault injection for the rerun tests: SIGKILL a job at a named point, as a crash or `kill -9` would.

Inert unless the environment variable BERTXML_FAULT names a point; the tests set it only in the
environment of a job they start as a subprocess in its own session (`start_new_session=True`):

    BERTXML_FAULT=score:udf python -m bertxml.cli score ...

Points:
- `score:udf`: in the scoring UDF's Python worker, on its second batch of notes (the model is running);
- `commit:<table>` (e.g. `commit:bertxml.rejects`): during a write to that table (`Warehouse.write` or
  `merge`), after Delta has begun writing its data files and before the log entry that commits them, so
  also after the job's earlier writes have committed. A watcher thread kills the job as soon as a new
  data file appears in the table's folder (path mode); `committed_versions` lets a test check that the
  commit indeed did not land.

The kill takes every process of the job's session: the Python driver, the JVM, PySpark's daemon and
its workers (which run in a process group of their own), so nothing gets to clean up.
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from pathlib import Path

ENV = "BERTXML_FAULT"


def armed(point: str) -> bool:
    return os.environ.get(ENV) == point


def kill_job() -> None:
    """SIGKILL every process in this process's session (Linux: found in /proc), then this process group."""
    sid, me = os.getsid(0), os.getpid()
    try:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        pids = []
    for pid in pids:
        if pid == me:
            continue
        try:
            # Fields after the command name, which is in parentheses and may hold spaces: state, ppid, pgrp, session.
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
            if int(fields[3]) == sid:
                os.kill(pid, signal.SIGKILL)
        except (OSError, ValueError, IndexError):
            continue
    os.killpg(os.getpgid(0), signal.SIGKILL)


def point(name: str) -> None:
    """Kill the job here when BERTXML_FAULT names this point."""
    if armed(name):
        kill_job()


@contextlib.contextmanager
def during_write(table: str, folder: Path):
    """Around a write to `table` (stored in `folder`): when BERTXML_FAULT is `commit:<table>`, kill the job
    as soon as a data file that was not there before appears in the folder, i.e. while the transaction
    writes its files and before it commits them to the log."""
    if not armed(f"commit:{table}"):
        yield
        return
    folder = Path(folder)

    def data_files():
        return {p for p in folder.rglob("*.parquet") if "_delta_log" not in p.parts} if folder.exists() else set()

    before, stop = data_files(), threading.Event()

    def watch():
        while not stop.is_set():
            if data_files() - before:
                kill_job()
            time.sleep(0.002)

    watcher = threading.Thread(target=watch, name="bertxml-fault", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        stop.set()
        watcher.join()


def committed_versions(folder: Path) -> list[int]:
    """The Delta versions committed in a table folder (its `_delta_log/<version>.json` files)."""
    log_dir = Path(folder) / "_delta_log"
    return sorted(int(p.stem) for p in log_dir.glob("*.json") if p.stem.isdigit()) if log_dir.exists() else []
