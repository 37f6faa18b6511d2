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
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from pyspark import InheritableThread, SparkConf
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import types as T

from bertxml.config import Config

log = logging.getLogger("bertxml.warehouse")

RESOURCES = Path(__file__).resolve().parent / "resources"
SOURCE_FORMATS = ("parquet", "csv", "delta", "json")


class SchemaError(ValueError):
    """An input whose columns are missing or of the wrong type: the job stops before writing."""


def get_spark(cfg: Config, app: str = "bertxml") -> SparkSession:
    """The job's SparkSession with Delta Lake enabled.

    Under spark-submit or on a cluster the master and the jars come from there; run as a plain Python
    program (the embedded default) it is local Spark with Delta's jars from the local cache.
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
        # distinct classes, so with the default a second job in the process recompiles all of them
        # (measured: ~165 Janino compiles per warm ETL at 100k notes, ~7 with this).
        "spark.sql.codegen.cache.maxEntries": "1000",
    }
    if local:
        from bertxml.jars import ensure_delta_jars, jars_not_in_spark

        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
        jars = ensure_delta_jars()
        settings.update({
            "spark.jars": ",".join(jars),
            # Also on the driver's own class path, so threads with their own class loader (the Thrift
            # server's sessions) find Delta's catalog classes too.
            "spark.driver.extraClassPath": os.pathsep.join(jars_not_in_spark(jars)),
            "spark.driver.memory": cfg.spark.driver_memory,
            "spark.ui.enabled": "false",
            "spark.databricks.delta.snapshotPartitions": "2",
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


def local_frame(spark: SparkSession, rows: list[tuple], schema: T.StructType) -> DataFrame:
    """A small DataFrame from rows held by the driver, through pandas and Arrow: unlike a list passed to
    createDataFrame, it starts no Python worker (a second or two in a job that has none running)."""
    import pandas as pd

    return spark.createDataFrame(pd.DataFrame(rows, columns=schema.fieldNames()), schema)


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
            if name not in self.hidden:
                found.append(self._register(name))
        from bertxml.views import create_views

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
            return (self.path(name) / "_delta_log").exists()
        return self.spark.catalog.tableExists(name)

    # ---- reads ---------------------------------------------------------------------------------------
    def table(self, name: str, version: int | None = None, timestamp: str | None = None) -> DataFrame:
        """A Delta table by name, optionally as of a version or timestamp (time travel)."""
        if not self.exists(name):
            raise FileNotFoundError(f"table {name} does not exist in the warehouse at {self.workdir}"
                                    if self.path_mode else f"table {name} does not exist")
        reader = self.spark.read.format("delta")
        if version is not None:
            reader = reader.option("versionAsOf", int(version))
        if timestamp is not None:
            reader = reader.option("timestampAsOf", timestamp)
        return reader.load(str(self.path(name))) if self.path_mode else reader.table(name)

    def version(self, name: str) -> int | None:
        """The table's latest Delta version, or None if it does not exist.

        Path mode reads it off the log folder (every commit writes `<version>.json` there), which costs
        nothing; a catalog table asks Delta's history (a small Spark job).
        """
        if not self.exists(name):
            return None
        if self.path_mode:
            commits = (p.stem for p in (self.path(name) / "_delta_log").glob("*.json"))
            return max((int(stem) for stem in commits if stem.isdigit()), default=None)
        from delta.tables import DeltaTable

        return int(DeltaTable.forName(self.spark, name).history(1).select("version").first()[0])

    def rows_written(self, name: str, version: int) -> int | None:
        """How many rows the commit of `version` wrote (Delta's operationMetrics.numOutputRows), or None
        when the commit does not say. Path mode reads the commit file itself; no Spark job."""
        if self.path_mode:
            commit = self.path(name) / "_delta_log" / f"{int(version):020d}.json"
            actions = (json.loads(line) for line in commit.read_text().splitlines() if line.strip())
            info = next((a["commitInfo"] for a in actions if "commitInfo" in a), {})
        else:
            from delta.tables import DeltaTable

            row = (DeltaTable.forName(self.spark, name).history().filter(f"version = {int(version)}")
                   .select("operationMetrics").first())
            info = {"operationMetrics": row[0] if row else None}
        rows = (info.get("operationMetrics") or {}).get("numOutputRows")
        return int(rows) if rows is not None else None

    def read_source(self, spec: str, schema: T.StructType, what: str, version: int | None = None,
                    timestamp: str | None = None) -> tuple[DataFrame, dict]:
        """Read a SOURCE (table name or parquet:/csv:/json:/delta:PATH), check its schema.

        Returns the frame with exactly `schema`'s columns and a record of what was read
        ({'source': spec, 'version': n}) for the job's lineage.
        """
        fmt, where = parse_source(spec)
        if fmt != "table" and fmt != "delta" and (version is not None or timestamp is not None):
            raise ValueError(f"{what}: --as-of-version/--as-of-timestamp need a Delta source, got {spec}")
        if fmt == "table":
            # Pinned to the version recorded, so every pass of a job over it reads the same snapshot even
            # while the feed appends (the ETL reads the notes more than once).
            read_version = version if version is not None else (None if timestamp else self.version(where))
            df = self.table(where, read_version, timestamp)
        elif fmt == "delta":
            reader = self.spark.read.format("delta")
            if version is not None:
                reader = reader.option("versionAsOf", int(version))
            if timestamp is not None:
                reader = reader.option("timestampAsOf", timestamp)
            df = reader.load(where)
            read_version = version
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
              metadata: str | None = None, partition_by: tuple[str, ...] = ()) -> int:
        """Write df to a Delta table in ONE transaction and return the new table version.

        mode "overwrite" replaces the table (or, with replace_where, only the rows matching it);
        "append" adds rows. The schema is overwritten only on a full overwrite. `partition_by` lays out
        a table this write creates or wholly replaces; an existing table otherwise keeps its layout.
        """
        writer = df.write.format("delta").mode(mode)
        if partition_by and (not self.exists(name) or (mode == "overwrite" and not replace_where)):
            writer = writer.partitionBy(*partition_by)
        if replace_where:
            writer = writer.option("replaceWhere", replace_where)
        elif mode == "overwrite":
            writer = writer.option("overwriteSchema", "true")
        if metadata:
            writer = writer.option("userMetadata", metadata)
        if self.path_mode:
            writer.save(str(self.path(name)))
            self._register(name)
        else:
            writer.saveAsTable(name)
        version = self.version(name)
        log.info("wrote %s (Delta version %s, %s)", name, version,
                 f"replaceWhere {replace_where}" if replace_where else mode)
        return version

    def merge(self, df: DataFrame, name: str, keys: list[str]) -> int:
        """Upsert df into a Delta table keyed on `keys` (one MERGE transaction); creates it if absent."""
        from delta.tables import DeltaTable

        if not self.exists(name):
            return self.write(df, name)
        target = (DeltaTable.forPath(self.spark, str(self.path(name))) if self.path_mode
                  else DeltaTable.forName(self.spark, name))
        condition = " AND ".join(f"t.`{k}` = s.`{k}`" for k in keys)
        (target.alias("t").merge(df.alias("s"), condition)
         .whenMatchedUpdateAll().whenNotMatchedInsertAll().execute())
        version = self.version(name)
        log.info("merged into %s on %s (Delta version %s)", name, ", ".join(keys), version)
        return version
