"""`bertxml sql-server`: Spark's Thrift JDBC/ODBC server over the warehouse, with Delta, on localhost.

    bertxml sql-server --port 10000            # then: beeline -u jdbc:hive2://localhost:10000

The server runs in this process's SparkSession, so it sees the same registered Delta tables and views;
every query reads the newest committed snapshot, so analysts can query while the nightly job writes.
Tables created after start-up are picked up by a re-registration every `refresh_seconds`.
The jars (spark-hive-thriftserver, hive-jdbc, beeline) ship with pyspark; nothing is downloaded.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
from pathlib import Path

log = logging.getLogger("bertxml.sqlserver")


def start_thrift_server(wh, port: int = 10000, host: str = "localhost"):
    """Start HiveThriftServer2 on host:port inside wh's SparkSession; returns the JVM server object."""
    spark = wh.spark
    spark.conf.set("hive.server2.thrift.port", str(port))
    spark.conf.set("hive.server2.thrift.bind.host", host)
    spark.conf.set("hive.server2.transport.mode", "binary")
    jvm = spark.sparkContext._jvm
    server = jvm.org.apache.spark.sql.hive.thriftserver.HiveThriftServer2.startWithContext(
        spark._jsparkSession.sqlContext())
    wait_for_port(host, port)
    log.info("Thrift JDBC/ODBC server on jdbc:hive2://%s:%d (warehouse %s)", host, port, wh.workdir)
    return server


def wait_for_port(host: str, port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"the Thrift server did not open {host}:{port} within {timeout:.0f}s")


def beeline_path() -> Path:
    """The beeline client shipped inside pyspark."""
    import pyspark

    return Path(pyspark.__file__).parent / "bin" / "beeline"


def serve(wh, port: int = 10000, host: str = "localhost", refresh_seconds: float = 30.0,
          stop: threading.Event | None = None) -> None:
    """Run the server until interrupted (or `stop` is set), re-registering new tables periodically."""
    server = start_thrift_server(wh, port, host)
    print(f"Thrift server ready: {beeline_path()} -u jdbc:hive2://{host}:{port}  (Ctrl-C to stop)", flush=True)
    stop = stop or threading.Event()
    try:
        while not stop.wait(refresh_seconds):
            wh.register_tables()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
        log.info("Thrift server stopped")


def spark_home_env() -> dict:
    """Environment for running pyspark's bin/beeline."""
    env = dict(os.environ)
    env.setdefault("SPARK_HOME", str(beeline_path().parent.parent))
    return env
