"""`bertxml sql-server`: a real JDBC client (pyspark's beeline) against the Thrift server over Delta tables.

Two servers, each started as the real command (`python -m bertxml.cli sql-server`, its own JVM) over a tiny
warehouse written by the shared session, and shared by its assertions: the default one (no note text,
password logins) and one whose operator opted in to the text. Tests bind and connect to loopback only.
"""
import datetime as dt
import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from bertxml.platform import tables as t
from bertxml.cli import main
from bertxml.platform.sqlserver import (UnsafeServerError, beeline_path, check_bind, hash_password, is_loopback,
                                        spark_home_env, verify_password)

ROOT = Path(__file__).resolve().parents[1]
SECRET = "Pt reports CANARY-7Q3 chest pain"  # stands for note text: must never come back by default
GUARD = "note text is not served"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def beeline(port: int, query, password_file=None, user: str = "analyst", force: bool = False, script=None):
    """Run a statement (-e) or a script file (-f) through beeline; returns the CompletedProcess."""
    cmd = [str(beeline_path()), "-u", f"jdbc:hive2://127.0.0.1:{port}", "--silent=true",
           "--outputformat=csv2", "-n", user, *(["-f", str(script)] if script else ["-e", query])]
    if password_file:
        cmd[3:3] = ["-w", str(password_file)]  # beeline reads the password from this file
    if force:
        cmd.append("--force=true")  # go on after a failed statement
    return subprocess.run(cmd, capture_output=True, text=True, env=spark_home_env(), timeout=180)


def lines(out) -> list[str]:
    assert out.returncode == 0, out.stderr[-2000:]
    return [line for line in out.stdout.splitlines() if line.strip() and "jdbc:hive2" not in line]


def write_warehouse(wh, spark):
    rows = [("P1", "E1", "I10", dt.date(2024, 1, 2)), ("P2", "E2", "E11.9", dt.date(2024, 1, 3))]
    wh.write(spark.createDataFrame(rows, t.DIAGNOSES_SCHEMA), "ehr.diagnoses")
    note = ("N1", "P1", "E1", dt.date(2024, 1, 2), "progress", "md", "final", SECRET)
    wh.write(spark.createDataFrame([note], t.NOTES_SCHEMA), "ehr.notes")
    return rows


@contextmanager
def sql_server(workdir: Path, *options: str):
    """`bertxml sql-server` on a free loopback port as a subprocess; yields the port, stops it at the end."""
    port = free_port()
    cmd = [sys.executable, "-m", "bertxml.cli", "sql-server", "--workdir", str(workdir), "--host", "127.0.0.1",
           "--port", str(port), "--set", "spark.master=local[1]", "--set", "spark.driver_memory=1g",
           "--set", "sqlserver.refresh_seconds=3600", *options]
    output = workdir.parent / f"server-{port}.log"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    with open(output, "w") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, env=env, cwd=workdir.parent)
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, f"sql-server exited {proc.returncode}: {output.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"sql-server never listened: {output.read_text()[-3000:]}"
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(1)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_default_server_serves_no_text_and_checks_passwords(wh, spark, tmp_path):
    rows = write_warehouse(wh, spark)
    users = tmp_path / "users"
    users.write_text(hash_password("analyst", "right-horse-battery", iterations=1000) + "\n")
    (tmp_path / "right").write_text("right-horse-battery")
    (tmp_path / "wrong").write_text("wrong-horse-battery")
    with sql_server(wh.workdir, "--set", f"sqlserver.password_file={users}") as port:
        # Logins: the wrong password and an unknown user are refused, the right one is let in, twice in a
        # row (each login loads the authenticator class anew, on whichever server thread takes it).
        for user, password in (("analyst", "wrong"), ("intruder", "right")):
            refused = beeline(port, "SELECT count(*) FROM ehr.diagnoses", tmp_path / password, user)
            assert refused.returncode != 0 and "2" not in lines_or_empty(refused)
            assert "Error validating the login" in refused.stderr, refused.stderr[-2000:]
        for _ in range(2):
            assert lines(beeline(port, "SELECT count(*) AS n FROM ehr.diagnoses", tmp_path / "right"))[-1] == "2"
        # A write committed while the server runs is visible to the next query.
        wh.write(spark.createDataFrame(rows[:1], t.DIAGNOSES_SCHEMA), "ehr.diagnoses", mode="append")
        assert lines(beeline(port, "SELECT count(*) AS n FROM ehr.diagnoses", tmp_path / "right"))[-1] == "3"
        shown = lines(beeline(port, "SHOW TABLES IN ehr", tmp_path / "right"))
        assert [line for line in shown if line.startswith("ehr,")] == ["ehr,diagnoses,false"], shown

        # The text, by every route: by name, by path (path queries are off, and with them switched back on
        # the guard refuses), through the log's statistics, through a table created over the folder.
        notes = wh.path("ehr.notes")
        attempts = [
            "SELECT text FROM ehr.notes",
            f"SELECT text FROM delta.`{notes}`",
            "SET spark.sql.runSQLOnFiles=true",
            f"SELECT text FROM delta.`{notes}`",
            f"SELECT * FROM json.`{notes}/_delta_log`",
            f"SELECT * FROM parquet.`{notes}/../notes`",
            f"CREATE TABLE default.notes_copy USING DELTA LOCATION '{notes}'",
            "SELECT text FROM default.notes_copy",
            "SELECT reflect('java.lang.System', 'getProperty', 'user.home')",
        ]
        # By name and by path, each on its own login: refused, and the text nowhere in the reply.
        for query, reason in ((attempts[0], "TABLE_OR_VIEW_NOT_FOUND"), (attempts[1], "")):
            out = beeline(port, query, tmp_path / "right")
            assert out.returncode != 0 and reason in out.stderr, out.stderr[-3000:]
            assert "CANARY" not in out.stdout + out.stderr
        # All routes in one script (beeline's --force goes on after a failed statement only with -f).
        script = tmp_path / "attempts.sql"
        script.write_text(";\n".join(attempts) + ";\n")
        out = beeline(port, None, tmp_path / "right", force=True, script=script)
        assert "CANARY" not in out.stdout + out.stderr
        assert GUARD in out.stderr, out.stderr[-3000:]
        assert "reflect/java_method are not served" in out.stderr, out.stderr[-3000:]


def lines_or_empty(out) -> list[str]:
    return [line for line in out.stdout.splitlines() if line.strip()]


def test_opted_in_server_serves_text(wh, spark):
    write_warehouse(wh, spark)
    with sql_server(wh.workdir, "--allow-text") as port:
        served = lines(beeline(port, "SELECT text FROM ehr.notes"))
        assert served.count(SECRET) == 1, len(served)  # the one note's text (not printed: a stand-in for PHI)


def test_non_loopback_host_needs_a_password_file(tmp_path, capsys):
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("")
    # Refused before anything starts (no Spark, nothing bound): exit 2 with the reason.
    assert main(["sql-server", "--workdir", str(tmp_path), "--host", "0.0.0.0"]) == 2
    assert "not a loopback address" in capsys.readouterr().err
    users = tmp_path / "users"
    with pytest.raises(UnsafeServerError, match="does not exist"):
        check_bind("0.0.0.0", str(users))
    users.write_text(hash_password("analyst", "pw", iterations=1000) + "\n")
    check_bind("0.0.0.0", str(users))  # with logins authenticated it may listen beyond loopback


def test_password_file_lines(monkeypatch, capsys):
    line = hash_password("analyst", "s3cret", iterations=1000)
    assert line.startswith("analyst:pbkdf2_sha256:1000:")
    assert verify_password(line, "s3cret") and not verify_password(line, "s3cret ")
    assert hash_password("analyst", "s3cret") != hash_password("analyst", "s3cret")  # salted
    import io
    monkeypatch.setattr("sys.stdin", io.StringIO("from stdin\n"))
    assert main(["sql-server", "--hash-password", "bob"]) == 0
    printed = capsys.readouterr().out.strip()
    assert "from stdin" not in printed and verify_password(printed, "from stdin")
