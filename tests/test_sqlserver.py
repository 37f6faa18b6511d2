"""`bertxml sql-server`: a real JDBC client (pyspark's beeline) queries the Delta tables while a job writes."""
import datetime as dt
import socket
import subprocess

from bertxml import tables as t
from bertxml.sqlserver import beeline_path, spark_home_env, start_thrift_server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def beeline(port: int, query: str) -> list[str]:
    """Run one query through beeline; returns the CSV lines (header first) without its prompt echo."""
    out = subprocess.run([str(beeline_path()), "-u", f"jdbc:hive2://localhost:{port}", "--silent=true",
                          "--outputformat=csv2", "-e", query], capture_output=True, text=True,
                         env=spark_home_env(), timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    return [line for line in out.stdout.splitlines() if line.strip() and "jdbc:hive2" not in line]


def test_beeline_reads_delta_tables_and_sees_new_commits(wh, spark):
    rows = [("P1", "E1", "I10", dt.date(2024, 1, 2)), ("P2", "E2", "E11.9", dt.date(2024, 1, 3))]
    wh.write(spark.createDataFrame(rows, t.DIAGNOSES_SCHEMA), "ehr.diagnoses")
    port = free_port()
    server = start_thrift_server(wh, port)
    try:
        assert beeline(port, "SELECT count(*) AS n FROM ehr.diagnoses")[-1] == "2"
        # A write committed while the server runs is visible to the next query.
        wh.write(spark.createDataFrame(rows[:1], t.DIAGNOSES_SCHEMA), "ehr.diagnoses", mode="append")
        assert beeline(port, "SELECT count(*) AS n FROM ehr.diagnoses")[-1] == "3"
    finally:
        server.stop()
