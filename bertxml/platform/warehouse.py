"""The warehouse: a SparkSession with real Delta Lake, table names resolved to Delta tables, safe writes.

Two catalog modes (WarehouseConfig.catalog):
- "path" (the embedded default): every table is a Delta folder `WORKDIR/tables/<schema>/<table>`. Spark
  runs with an in-memory catalog and each session registers the folders it finds as external tables at
  start-up, so any number of processes (a nightly job while an analyst queries) share the warehouse;
  an embedded Derby metastore would admit only one.
- "metastore": the cluster's own catalog; names such as `main.ehr.notes` are used as they are.

Every write is one Delta transaction (overwrite, replaceWhere or MERGE), so a failed job leaves each table
as it was and a rerun never duplicates rows.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from delta.tables import DeltaTable
from pyspark import InheritableThread, SparkConf
from pyspark.sql import DataFrame, SparkSession, functions as F, types as T

from bertxml.config import Config
from bertxml.platform import faults
from bertxml.platform.jars import ensure_delta_jars, jars_not_in_spark
from bertxml.platform.views import create_views

log = logging.getLogger("bertxml.platform.warehouse")

RESOURCES = Path(__file__).resolve().parent.parent / "resources"
SOURCE_FORMATS = ("parquet", "csv", "delta", "json")


class SchemaError(ValueError):
    """An input whose columns are missing or of the wrong type: the job stops before writing."""


def get_spark(cfg: Config, app: str = "bertxml", class_path: tuple[str, ...] = ()) -> SparkSession:
    """The job's SparkSession with Delta Lake enabled.

    Under spark-submit or on a cluster the master and the jars come from there; run as a plain Python
    program (the embedded default) it is local Spark with Delta's jars from the local cache, plus the jars
    in `class_path` on the driver JVM's system class path (classes that Spark or Hive load by name from
    any thread, such as the SQL server's authenticator).
    """
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    existing = SparkSession.getActiveSession()
    if existing is not None:
        return existing
    builder = SparkSession.builder.appName(app)
    master = SparkConf().get("spark.master", None)
    local = master is None or master.startswith("local")
    if master is None:
        builder = builder.master(cfg.spark.master)
    settings = {
        "spark.sql.extensions": "io.delta.sql.DeltaSparkSessionExtension",
        "spark.sql.catalog.spark_catalog": "org.apache.spark.sql.delta.catalog.DeltaCatalog",
        "spark.sql.shuffle.partitions": str(cfg.spark.shuffle_partitions),
        "spark.ui.showConsoleProgress": "false",
        "spark.sql.session.timeZone": "UTC",
        "spark.sql.execution.arrow.pyspark.enabled": "true",
        # Compiled query code is cached by its source, 100 entries by default. One ETL generates ~170
        # distinct classes, so with the default a second job in the process recompiles all of them.
        "spark.sql.codegen.cache.maxEntries": "1000",
    }
    if local:
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
        jars = ensure_delta_jars()
        settings.update({
            "spark.jars": ",".join(jars),
            # Also on the driver's own class path, so threads with their own class loader (the Thrift
            # server's sessions) find Delta's catalog classes too.
            "spark.driver.extraClassPath": os.pathsep.join([*jars_not_in_spark(jars), *map(str, class_path)]),
            "spark.driver.memory": cfg.spark.driver_memory,
            "spark.ui.enabled": "false",
            "spark.databricks.delta.snapshotPartitions": "2",
            # Shuffle and spill files and disk-cached blocks hold note text (PHI): AES-encrypted on disk
            # with a key that lives only in this application's memory (SparkConfig.io_encryption).
            "spark.io.encryption.enabled": str(bool(cfg.spark.io_encryption)).lower(),
            "spark.driver.extraJavaOptions":
                f"-Dlog4j2.configurationFile=file:{RESOURCES / 'log4j2.properties'}",
        })
        if cfg.warehouse.catalog == "path":
            settings["spark.sql.catalogImplementation"] = "in-memory"
    settings.update({k: str(v) for k, v in cfg.spark.conf.items()})
    for key, value in settings.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel(cfg.spark.log_level)
    return spark


def parse_source(spec: str) -> tuple[str, str]:
    """'parquet:PATH' -> ('parquet', PATH); a bare name -> ('table', name)."""
    fmt, sep, rest = spec.partition(":")
    if sep and fmt in SOURCE_FORMATS:
        return fmt, rest
    return "table", spec


def check_schema(df: DataFrame, expected: T.StructType, what: str) -> DataFrame:
    """Select the expected columns, in order, or raise SchemaError naming each missing or mistyped one."""
    actual = {f.name.lower(): f for f in df.schema.fields}
    problems = []
    for field in expected.fields:
        found = actual.get(field.name.lower())
        if found is None:
            problems.append(f"missing column '{field.name}' ({field.dataType.simpleString()})")
        elif found.dataType != field.dataType and not (
                isinstance(field.dataType, T.StringType) and isinstance(found.dataType, (T.VarcharType, T.CharType))):
            problems.append(f"column '{field.name}' is {found.dataType.simpleString()}, "
                            f"expected {field.dataType.simpleString()}")
    if problems:
        raise SchemaError(f"{what}: " + "; ".join(problems))
    return df.select(*[df[actual[f.name.lower()].name].cast(f.dataType).alias(f.name) for f in expected.fields])


def sql_string(value: str) -> str:
    """A Spark SQL string literal of value (quotes and backslashes escaped)."""
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


def log_version(folder: str | Path) -> int | None:
    """The latest version of a local Delta folder, off its log (every commit writes `<version>.json`)."""
    commits = (p.stem for p in (Path(folder) / "_delta_log").glob("*.json"))
    return max((int(stem) for stem in commits if stem.isdigit()), default=None)


def parse_utc_timestamp(text: str) -> dt.datetime:
    """'2024-06-01', '2024-06-01 02:30:00' or '2024-06-01T02:30:00+02:00' as an aware UTC datetime (UTC
    when no offset is given); ValueError naming the text otherwise."""
    try:
        when = dt.datetime.fromisoformat(str(text).strip())
    except ValueError:
        raise ValueError(f"{text!r} is not a timestamp: expected e.g. 2024-06-01, 2024-06-01 02:30:00 "
                         "or 2024-06-01T02:30:00+02:00 (UTC unless an offset is given)") from None
    return (when.replace(tzinfo=dt.timezone.utc) if when.tzinfo is None else when).astimezone(dt.timezone.utc)


def local_frame(spark: SparkSession, rows: list[tuple], schema: T.StructType) -> DataFrame:
    """A small DataFrame from rows held by the driver, through pandas and Arrow: unlike a list passed to
    createDataFrame, it starts no Python worker (a second or two in a job that has none running)."""
    return spark.createDataFrame(pd.DataFrame(rows, columns=schema.fieldNames()), schema)


def _has_commit(log_dir: Path) -> bool:
    """Whether a Delta log folder holds a commit (`<version>.json`, or a checkpoint after log cleanup)."""
    return log_dir.is_dir() and any(p.name.split(".")[0].isdigit() for p in log_dir.iterdir()
                                    if p.name.endswith(".json") or ".checkpoint" in p.name)


@dataclass
class Warehouse:
    """Resolves table names for one SparkSession and writes Delta tables safely."""

    spark: SparkSession
    workdir: Path
    cfg: Config
    hidden: frozenset = frozenset()  # qualified names this session's catalog must not register

    def __post_init__(self):
        self.workdir = Path(self.workdir).resolve()
        if self.path_mode:
            self.register_tables()

    @property
    def path_mode(self) -> bool:
        return self.cfg.warehouse.catalog == "path"

    def name(self, short: str) -> str:
        """Qualified name of one of our output tables ('labeled_notes' -> 'bertxml.labeled_notes')."""
        return f"{self.cfg.warehouse.schema}.{short}"

    def path(self, name: str) -> Path:
        schema, _, table = name.rpartition(".")
        return self.workdir / "tables" / (schema or "default") / table

    # ---- catalog -------------------------------------------------------------------------------------
    def register_tables(self) -> list[str]:
        """Register every Delta folder under WORKDIR/tables in this session's catalog, and our views."""
        found = []
        root = self.workdir / "tables"
        for log_dir in sorted(root.glob("*/*/_delta_log")) if root.exists() else []:
            table_dir = log_dir.parent
            name = f"{table_dir.parent.name}.{table_dir.name}"
            # a first write killed before its commit leaves a log folder, no table
            if name not in self.hidden and _has_commit(log_dir):
                found.append(self._register(name))

        create_views(self)
        return found

    def _register(self, name: str) -> str:
        """Point the session's catalog entry `name` at this warehouse's folder. The session remembers
        where each name points (a conf key), so a session reused for another workdir (tests, benchmarks)
        re-points the name instead of reading the other warehouse's table or a deleted folder."""
        schema = name.rpartition(".")[0]
        location, key = str(self.path(name)), f"bertxml.registered.{name}"
        if self.spark.conf.get(key, None) == location:
            return name
        self.spark.sql(f"CREATE DATABASE IF NOT EXISTS `{schema}`")
        self.spark.sql(f"DROP TABLE IF EXISTS {name}")  # external: only the catalog entry goes
        self.spark.sql(f"CREATE TABLE {name} USING DELTA LOCATION '{location}'")
        self.spark.conf.set(key, location)
        return name

    def exists(self, name: str) -> bool:
        if self.path_mode:
            return _has_commit(self.path(name) / "_delta_log")
        return self.spark.catalog.tableExists(name)

    # ---- reads ---------------------------------------------------------------------------------------
    def table(self, name: str, version: int | None = None, timestamp: str | None = None) -> DataFrame:
        """A Delta table by name, optionally as of a version or timestamp (time travel)."""
        if not self.exists(name):
            raise self._missing(name)
        reader = self.spark.read.format("delta")
        if version is not None:
            reader = reader.option("versionAsOf", int(version))
        if timestamp is not None:
            reader = reader.option("timestampAsOf", timestamp)
        return reader.load(str(self.path(name))) if self.path_mode else reader.table(name)

    def _missing(self, name: str) -> FileNotFoundError:
        return FileNotFoundError(f"table {name} does not exist in the warehouse at {self.workdir}"
                                 if self.path_mode else f"table {name} does not exist")

    def version(self, name: str) -> int | None:
        """The table's latest Delta version, or None if it does not exist.

        Path mode reads it off the log folder (every commit writes `<version>.json` there), which costs
        nothing; a catalog table asks Delta's history (a small Spark job).
        """
        if not self.exists(name):
            return None
        if self.path_mode:
            return log_version(self.path(name))

        return int(DeltaTable.forName(self.spark, name).history(1).select("version").first()[0])

    def _delta_table(self, fmt: str, where: str):
        """delta.tables.DeltaTable of a catalog table (`fmt` 'table') or a Delta folder (`fmt` 'delta')."""
        if fmt == "delta":
            return DeltaTable.forPath(self.spark, where)
        return (DeltaTable.forPath(self.spark, str(self.path(where))) if self.path_mode
                else DeltaTable.forName(self.spark, where))

    def version_at(self, fmt: str, where: str, timestamp: str, what: str = "table") -> int:
        """The version of a Delta table (`fmt` 'table') or folder (`fmt` 'delta') as of `timestamp`: its
        latest commit at or before then, by the commit times Delta's history reports (the ones its own
        timestampAsOf uses). A timestamp without an offset is UTC.

        Unlike timestampAsOf, a time after the latest commit is allowed (the table has not changed since),
        so one timestamp pins tables that change at different times; a time still to come is refused,
        since a commit could still land before it."""
        when = parse_utc_timestamp(timestamp)
        if when > dt.datetime.now(dt.timezone.utc):
            raise ValueError(f"{what}: as of {timestamp}: that time is still to come, and the table could "
                             "still change before it")
        history = self._delta_table(fmt, where).history().select("version", "timestamp")
        cutoff = F.lit(when.strftime("%Y-%m-%d %H:%M:%S.%f")).cast("timestamp")  # the session's zone is UTC
        row = history.agg(F.max(F.when(F.col("timestamp") <= cutoff, F.col("version"))).alias("version"),
                          F.date_format(F.min("timestamp"), "yyyy-MM-dd HH:mm:ss.SSS").alias("first")).first()
        if row["version"] is None:
            raise ValueError(f"{what}: as of {timestamp}: {where} has no version that old (its oldest "
                             f"commit in the log is at {row['first']} UTC)")
        return int(row["version"])

    def commit_time(self, name: str, version: int) -> str:
        """The UTC time of one commit of a table, as Delta's history reports it ('YYYY-MM-DD HH:MM:SS.mmm',
        the form `version_at` and `--as-of-timestamp` take)."""
        row = (self._delta_table("table", name).history().filter(F.col("version") == int(version))
               .select(F.date_format("timestamp", "yyyy-MM-dd HH:mm:ss.SSS").alias("at")).first())
        if row is None:
            raise ValueError(f"{name} has no version {version} in its log")
        return row["at"]

    def _commit_info(self, name: str, version: int) -> dict:
        """commitInfo of one commit of a table of ours. Path mode reads the commit file (no Spark job); a
        commit file cleaned up after a checkpoint gives {}."""
        if self.path_mode:
            commit = self.path(name) / "_delta_log" / f"{int(version):020d}.json"
            if not commit.exists():
                return {}
            actions = (json.loads(line) for line in commit.read_text().splitlines() if line.strip())
            return next((a["commitInfo"] for a in actions if "commitInfo" in a), {})

        row = (DeltaTable.forName(self.spark, name).history().filter(f"version = {int(version)}")
               .select("operationMetrics", "userMetadata").first())
        return row.asDict() if row else {}

    def rows_written(self, name: str, version: int) -> int | None:
        """How many rows the commit of `version` wrote (Delta's operationMetrics.numOutputRows), or None
        when the commit does not say."""
        rows = (self._commit_info(name, version).get("operationMetrics") or {}).get("numOutputRows")
        return int(rows) if rows is not None else None

    def commit_metadata(self, name: str, version: int) -> dict | None:
        """The JSON a job of ours left in the commit of `version` (Delta's userMetadata: the ETL's lineage,
        the tokenizer of the chunks), or None when there is none."""
        meta = self._commit_info(name, version).get("userMetadata")
        try:
            return json.loads(meta) if meta else None
        except json.JSONDecodeError:
            return None

    def read_source(self, spec: str, schema: T.StructType, what: str, version: int | None = None,
                    timestamp: str | None = None) -> tuple[DataFrame, dict]:
        """Read a SOURCE (table name or parquet:/csv:/json:/delta:PATH), check its schema.

        A Delta source (a table name or delta:PATH) is read at one version: `version`, else its version as
        of `timestamp` (`version_at`), else its latest version now. Every pass of a job over the frame then
        reads the same snapshot even while the feed appends (the ETL reads the notes more than once), and
        the read can be repeated exactly (`bertxml etl --as-of-run`).

        Returns the frame with exactly `schema`'s columns and a record of what was read
        ({'source': spec, 'version': n or None for a file source, 'timestamp': timestamp}) for the job's lineage.
        """
        fmt, where = parse_source(spec)
        if version is not None and timestamp is not None:
            raise ValueError(f"{what}: give a version or a timestamp to read as of, not both")
        if fmt != "table" and fmt != "delta" and (version is not None or timestamp is not None):
            raise ValueError(f"{what}: reading as of an earlier run or a timestamp needs a Delta source "
                             f"(a table name or delta:PATH), got {spec}")
        if fmt in ("table", "delta"):
            if fmt == "table" and not self.exists(where):
                raise self._missing(where)
            if version is None:
                version = (self.version_at(fmt, where, timestamp, f"{what} ({spec})") if timestamp is not None
                           else self.version(where) if fmt == "table" else self._folder_version(where))
            if fmt == "table":
                df = self.table(where, version)
            else:
                df = self.spark.read.format("delta").option("versionAsOf", int(version)).load(where)
            read_version = int(version)
        elif fmt == "csv":
            df = self.spark.read.schema(schema).option("header", True).option("multiLine", True) \
                .option("escape", '"').csv(where)
            read_version = None
        else:
            if not Path(where).exists() and "://" not in where:
                raise FileNotFoundError(f"{what}: {where} does not exist")
            df = self.spark.read.format(fmt).load(where)
            read_version = None
        return check_schema(df, schema, f"{what} ({spec})"), {"source": spec, "version": read_version,
                                                             "timestamp": timestamp}

    def _folder_version(self, where: str) -> int:
        """The latest version of a delta:PATH source: off its log folder when local, else Delta's history."""
        local = Path(where.removeprefix("file:")) / "_delta_log"
        if "://" not in where and local.is_dir():
            found = log_version(local.parent)
            if found is not None:
                return found
        return int(self._delta_table("delta", where).history(1).select("version").first()[0])

    @contextlib.contextmanager
    def preloaded(self, names: list[str]):
        """Within the block, a background thread has Delta load the current state (the file list) of
        these tables; the block's end waits for it, so a job leaves no thread behind.

        Replacing a table's rows needs that state: a few small Spark jobs per table whatever its size
        (~0.3 s each on a 2-core machine). A job that wraps its work in this gets them done on the core
        its driver-side steps leave idle; the write then finds the state loaded (Delta keeps it per
        table version). Best effort: a table that is missing or does not load is skipped, and its write
        loads it as it would have.
        """
        def load():
            for name in names:
                try:
                    if self.exists(name):
                        self.table(name).inputFiles()
                except Exception as exc:  # noqa: BLE001 - only a head start; the write reports real problems
                    log.debug("preloading %s failed: %s", name, exc)

        thread = InheritableThread(target=load, name="bertxml-preload", daemon=True)
        thread.start()
        try:
            yield
        finally:
            thread.join()

    # ---- writes --------------------------------------------------------------------------------------
    def write(self, df: DataFrame, name: str, mode: str = "overwrite", replace_where: str | None = None,
              metadata: str | None = None, partition_by: tuple[str, ...] = (), merge_schema: bool = False) -> int:
        """Write df to a Delta table in ONE transaction and return the new table version.

        mode "overwrite" replaces the table (or, with replace_where, only the rows matching it);
        "append" adds rows. The schema is overwritten only on a full overwrite; `merge_schema` lets an
        append or replaceWhere add df's new columns to an existing table (its other rows get nulls).
        `partition_by` lays out a table this write creates or wholly replaces; an existing table otherwise
        keeps its layout.
        """
        writer = df.write.format("delta").mode(mode)
        if partition_by and (not self.exists(name) or (mode == "overwrite" and not replace_where)):
            writer = writer.partitionBy(*partition_by)
        if replace_where:
            writer = writer.option("replaceWhere", replace_where)
        elif mode == "overwrite":
            writer = writer.option("overwriteSchema", "true")
        if merge_schema and (replace_where or mode == "append"):
            writer = writer.option("mergeSchema", "true")
        if metadata:
            writer = writer.option("userMetadata", metadata)
        with faults.during_write(name, self.path(name)):
            if self.path_mode:
                writer.save(str(self.path(name)))
                self._register(name)
            else:
                writer.saveAsTable(name)
        version = self.version(name)
        log.info("wrote %s (Delta version %s, %s)", name, version,
                 f"replaceWhere {replace_where}" if replace_where else mode)
        return version

    def merge(self, df: DataFrame, name: str, keys: list[str], partition_by: tuple[str, ...] = (),
              delete_when: str | None = None, evolve_schema: bool = False) -> int:
        """Upsert df into a Delta table keyed on `keys` (one MERGE transaction); creates it (laid out by
        `partition_by`) if absent. To make a set of rows exactly df's, use `write(replace_where=...)`.

        `delete_when`, a condition on the source row `s` (e.g. "s.n_notes = 0"): such a row deletes its
        match and inserts nothing. `evolve_schema`: df's new columns are added to the table."""
        if not self.exists(name):
            if delete_when:
                df = df.alias("s").filter(f"NOT ({delete_when})")
            return self.write(df, name, partition_by=partition_by)
        target = (DeltaTable.forPath(self.spark, str(self.path(name))) if self.path_mode
                  else DeltaTable.forName(self.spark, name))
        condition = " AND ".join(f"t.`{k}` = s.`{k}`" for k in keys)
        builder = target.alias("t").merge(df.alias("s"), condition)
        if evolve_schema:
            builder = builder.withSchemaEvolution()
        if delete_when:
            builder = (builder.whenMatchedDelete(delete_when).whenMatchedUpdateAll()
                       .whenNotMatchedInsertAll(f"NOT ({delete_when})"))
        else:
            builder = builder.whenMatchedUpdateAll().whenNotMatchedInsertAll()
        with faults.during_write(name, self.path(name)):
            builder.execute()
        version = self.version(name)
        log.info("merged into %s on %s (Delta version %s)", name, ", ".join(keys), version)
        return version
