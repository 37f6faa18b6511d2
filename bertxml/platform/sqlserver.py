"""`bertxml sql-server`: Spark's Thrift JDBC/ODBC server over the warehouse, with Delta.

    bertxml sql-server --port 10000            # then: beeline -u jdbc:hive2://localhost:10000

What it serves, and to whom (README "SQL for analysts"):
- **No note text by default.** The server runs on a SparkSession of its own, with its own in-memory
  catalog, in which the tables that hold note text (WarehouseConfig.notes, `bertxml.labeled_notes`,
  `bertxml.chunks`, see tables.TEXT_TABLES) are not registered. A catalog is not a wall: SQL can
  name a folder directly (delta.`/path`, CREATE TABLE ... LOCATION), so the server session also runs
  a check rule (resources/java/.../PhiGuard.java) that refuses any plan reading a file under those
  tables' folders, their _delta_log included (Delta's column statistics hold the first characters
  of the text). `sqlserver.allow_text: true` (or --allow-text) is the operator's explicit opt-in.
- **Loopback only, unless logins are authenticated.** A --host that is not a loopback address needs
  `sqlserver.password_file`; without one the command exits 2 before starting anything. The file holds
  salted PBKDF2-SHA256 hashes (`bertxml sql-server --hash-password USER` writes a line), checked by
  Hive's CUSTOM authentication (resources/java/.../PasswordFileAuthenticator.java). Passwords never
  pass on a command line and are never logged.

The two Java classes are compiled with the JDK's javac on first use, against pyspark's own jars, into
a cache folder (BERTXML_CACHE_DIR, default ~/.cache/bertxml), before Spark starts, and put on the driver
JVM's system class path (spark.driver.extraClassPath); nothing is downloaded. Every query reads the newest committed snapshot, so
analysts can query while the nightly job writes; tables created after start-up are registered every
`sqlserver.refresh_seconds`. The jars (spark-hive-thriftserver, hive-jdbc, beeline) ship with pyspark.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import logging
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pyspark
from pyspark.sql import SparkSession

from bertxml.platform import tables as t
from bertxml.platform.warehouse import Warehouse

log = logging.getLogger("bertxml.platform.sqlserver")

JAVA_SOURCES = Path(__file__).resolve().parent.parent / "resources" / "java"
GUARD_CLASS = "bertxml.sqlserver.PhiGuard"
AUTH_CLASS = "bertxml.sqlserver.PasswordFileAuthenticator"
PASSWORD_FILE_PROPERTY = "bertxml.sqlserver.password_file"  # read by PasswordFileAuthenticator
PBKDF2_ITERATIONS = 600_000  # OWASP's figure for PBKDF2-HMAC-SHA256


class UnsafeServerError(ValueError):
    """A server setting that would expose the warehouse beyond what its operator allowed."""


# ---- who may connect ---------------------------------------------------------------------------------
def is_loopback(host: str) -> bool:
    """True when every address `host` resolves to is a loopback address (127.0.0.0/8, ::1)."""
    if not host:
        return False  # an empty bind host means every interface
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except socket.gaierror as exc:
        raise UnsafeServerError(f"--host {host!r} does not resolve: {exc}") from None
    return bool(addresses) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)


def check_bind(host: str, password_file: str | None) -> None:
    """Refuse a non-loopback host without authentication (UnsafeServerError), before anything starts."""
    if password_file:
        read_password_file(password_file)  # a missing or empty file is refused here, not at first login
        return
    if not is_loopback(host):
        raise UnsafeServerError(
            f"--host {host} is not a loopback address, and sqlserver.password_file is not set: the server "
            "would let anyone on the network query the warehouse without logging in. Listen on localhost, "
            "or create a password file with `bertxml sql-server --hash-password USER >> FILE` and set "
            "sqlserver.password_file=FILE")


def hash_password(user: str, password: str, iterations: int = PBKDF2_ITERATIONS,
                  salt: bytes | None = None) -> str:
    """One password-file line: USER:pbkdf2_sha256:ITERATIONS:SALT_BASE64:HASH_BASE64."""
    if not user or ":" in user or any(c.isspace() for c in user):
        raise ValueError(f"user name {user!r}: give a non-empty name without ':' or spaces")
    if not password:
        raise ValueError("the password is empty")
    salt = salt if salt is not None else secrets.token_bytes(16)
    digest = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    return ":".join([user, "pbkdf2_sha256", str(iterations), base64.b64encode(salt).decode(),
                     base64.b64encode(digest).decode()])


def read_password_file(path: str | Path) -> dict[str, str]:
    """user -> line of a password file; raises UnsafeServerError if it is missing, empty or malformed."""
    path = Path(path)
    if not path.is_file():
        raise UnsafeServerError(f"sqlserver.password_file {path} does not exist")
    users = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        fields = line.strip().split(":")
        if len(fields) != 5 or fields[1] != "pbkdf2_sha256" or not fields[2].isdigit():
            raise UnsafeServerError(f"{path} line {number} is not USER:pbkdf2_sha256:ITERATIONS:SALT:HASH "
                                    "(write lines with `bertxml sql-server --hash-password USER`)")
        users[fields[0]] = line.strip()
    if not users:
        raise UnsafeServerError(f"sqlserver.password_file {path} holds no users")
    return users


def verify_password(line: str, password: str) -> bool:
    """Check a password against one password-file line (the Java authenticator does the same)."""
    _, _, iterations, salt, digest = line.split(":")
    actual = hashlib.pbkdf2_hmac("sha256", password.encode(), base64.b64decode(salt), int(iterations))
    return hmac.compare_digest(actual, base64.b64decode(digest))


# ---- the Java side -----------------------------------------------------------------------------------
def cache_dir() -> Path:
    return Path(os.environ.get("BERTXML_CACHE_DIR", Path.home() / ".cache" / "bertxml"))


def server_jar() -> Path:
    """The guard and authenticator classes as a jar, compiled on first use (keyed by source and Spark)."""
    sources = sorted(JAVA_SOURCES.rglob("*.java"))
    key = hashlib.sha256(pyspark.__version__.encode())
    for source in sources:
        key.update(source.read_bytes())
    jar = cache_dir() / "sqlserver" / key.hexdigest()[:16] / "bertxml-sqlserver.jar"
    if jar.exists():
        return jar
    javac, jar_tool = shutil.which("javac"), shutil.which("jar")
    if not javac or not jar_tool:
        raise RuntimeError("bertxml sql-server needs a JDK (javac and jar on PATH) to build its access "
                           "guard on first use; install one (e.g. openjdk-17-jdk-headless)")
    jar.parent.mkdir(parents=True, exist_ok=True)
    classpath = str(Path(pyspark.__file__).parent / "jars" / "*")
    with tempfile.TemporaryDirectory(dir=jar.parent) as tmp:
        classes = Path(tmp) / "classes"
        subprocess.run([javac, "-nowarn", "-encoding", "UTF-8", "-d", str(classes), "-cp", classpath,
                        *map(str, sources)], check=True, capture_output=True, text=True)
        staged = Path(tmp) / jar.name
        subprocess.run([jar_tool, "cf", str(staged), "-C", str(classes), "."], check=True)
        os.replace(staged, jar)  # atomic: a concurrent first use sees no half-written jar
    log.info("compiled the SQL server's guard into %s", jar)
    return jar


def text_locations(wh) -> list[str]:
    """The folders of the tables that hold note text (those that exist, in metastore mode)."""
    names = [wh.cfg.warehouse.notes] + [wh.name(name) for name in t.TEXT_TABLES]
    if wh.path_mode:
        return [str(wh.path(name)) for name in names]  # refused before they exist, too
    found = []
    for name in names:
        if wh.exists(name):
            found.append(wh.spark.sql(f"DESCRIBE DETAIL {name}").first()["location"])
    return found


# ---- the server --------------------------------------------------------------------------------------
@dataclass
class SqlServer:
    """A running Thrift server: its JVM object and the warehouse view (session, catalog) it serves."""

    server: object
    warehouse: object
    host: str
    port: int

    def refresh(self) -> list[str]:
        """Register tables created since start-up (the hidden ones stay out)."""
        return self.warehouse.register_tables()

    def stop(self) -> None:
        self.server.stop()
        log.info("Thrift server on %s:%d stopped", self.host, self.port)


def start_thrift_server(wh, port: int = 10000, host: str = "localhost", allow_text: bool | None = None,
                        password_file: str | None = None) -> SqlServer:
    """Start HiveThriftServer2 on host:port over wh's warehouse, on a session of its own.

    allow_text and password_file default to wh.cfg.sqlserver. Raises UnsafeServerError for a
    non-loopback host without a password file, before anything starts.
    """
    settings = wh.cfg.sqlserver
    allow_text = settings.allow_text if allow_text is None else allow_text
    password_file = password_file if password_file is not None else settings.password_file
    password_file = str(Path(password_file).resolve()) if password_file else ""
    check_bind(host, password_file)

    spark = wh.spark
    jvm = spark.sparkContext._jvm
    _check_on_class_path(jvm)
    hidden = [] if allow_text else [wh.cfg.warehouse.notes] + [wh.name(n) for n in t.TEXT_TABLES]
    guarded = text_locations(wh) if not allow_text else []
    # Path queries are off for every session the server opens (they inherit the shared state's initial
    # settings); the guard, not this, is what keeps the text folders out of reach, since a client may
    # SET it back.
    jsession = jvm.bertxml.sqlserver.PhiGuard.newGuardedSession(
        spark.sparkContext._jsc.sc(), {"spark.sql.runSQLOnFiles": "false"}, guarded)
    session = SparkSession(spark.sparkContext, jsparkSession=jsession)
    served = Warehouse(session, wh.workdir, wh.cfg, hidden=frozenset(hidden))
    session.conf.set("hive.server2.thrift.port", str(port))
    session.conf.set("hive.server2.thrift.bind.host", host)
    session.conf.set("hive.server2.transport.mode", "binary")
    if password_file:
        # Hive builds the CUSTOM provider from a fresh HiveConf, which reads JVM system properties.
        jvm.java.lang.System.setProperty("hive.server2.custom.authentication.class", AUTH_CLASS)
        jvm.java.lang.System.setProperty(PASSWORD_FILE_PROPERTY, password_file)
        session.conf.set("hive.server2.authentication", "CUSTOM")
    else:
        session.conf.set("hive.server2.authentication", "NONE")
    server = jvm.org.apache.spark.sql.hive.thriftserver.HiveThriftServer2.startWithContext(
        jsession.sqlContext())
    wait_for_port(host, port)
    log.info("Thrift JDBC/ODBC server on jdbc:hive2://%s:%d (warehouse %s; note text %s; logins %s)",
             host, port, wh.workdir, "served" if allow_text else "not served",
             "need a password" if password_file else "not authenticated")
    return SqlServer(server, served, host, port)


def _check_on_class_path(jvm) -> None:
    """The guard and authenticator must be on the JVM's system class path: Hive loads the authenticator
    by name at every login, with the class loader of whichever server thread takes it, and only the
    system one is shared by all. Jars cannot join it once the JVM runs, so `bertxml sql-server` puts
    server_jar() on spark.driver.extraClassPath before it starts Spark (get_spark's class_path)."""
    loader = jvm.java.lang.ClassLoader.getSystemClassLoader()
    for name in (GUARD_CLASS, AUTH_CLASS):
        try:
            jvm.java.lang.Class.forName(name, False, loader)
        except Exception:  # py4j's error for a ClassNotFoundException
            raise RuntimeError(
                f"{name} is not on the driver's class path: start Spark with "
                f"spark.driver.extraClassPath={server_jar()} (spark-submit --driver-class-path), "
                "as `bertxml sql-server` does") from None


def wait_for_port(host: str, port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"the Thrift server did not open {host}:{port} within {timeout:.0f}s")


def beeline_path() -> Path:
    """The beeline client shipped inside pyspark."""
    return Path(pyspark.__file__).parent / "bin" / "beeline"


def serve(wh, port: int = 10000, host: str = "localhost", allow_text: bool | None = None,
          stop: threading.Event | None = None) -> None:
    """Run the server until interrupted (or `stop` is set), registering new tables periodically."""
    server = start_thrift_server(wh, port, host, allow_text)
    print(f"Thrift server ready: {beeline_path()} -u jdbc:hive2://{host}:{port}  (Ctrl-C to stop)", flush=True)
    stop = stop or threading.Event()
    try:
        while not stop.wait(wh.cfg.sqlserver.refresh_seconds):
            server.refresh()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


def spark_home_env() -> dict:
    """Environment for running pyspark's bin/beeline."""
    env = dict(os.environ)
    env.setdefault("SPARK_HOME", str(beeline_path().parent.parent))
    return env
