"""Read a Delta table at a pinned version without Spark or a JVM: training's reader for `bertxml.chunks`.

    from bertxml.platform.deltaread import read_delta
    table = read_delta(wh.path("bertxml.chunks"), version=7, columns=["input_ids", "label_ids"],
                       filter={"max_len": 512, "split": ["train"]})

The `deltalake` package (delta-rs) replays the log and scans the data files with its DataFusion engine,
so the protocol features delta-spark may turn on (deletion vectors, column mapping, v2 checkpoints) read
as Spark reads them, and so do tables on object stores (s3://, abfss://, gs://: pass storage_options).
What this module adds: a filter as a dict, the table's own Arrow types (the engine hands strings back as
views) and errors that name the table and the version.
"""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa
from deltalake import DeltaTable
from deltalake.exceptions import DeltaError, TableNotFoundError


class DeltaLogError(ValueError):
    """A Delta table that cannot be read at the asked version (missing, no such version, not a Delta table)."""


def table_path(workdir: str | Path, schema: str, short: str) -> Path:
    """Delta folder of one of our tables in a path-mode warehouse, without a SparkSession
    (the same layout as Warehouse.path: WORKDIR/tables/<schema>/<table>)."""
    return Path(workdir).resolve() / "tables" / schema / short


def open_table(table_path, version: int | None = None, storage_options: dict | None = None) -> DeltaTable:
    """The deltalake DeltaTable at table_path as of version (None: latest)."""
    try:
        table = DeltaTable(str(table_path), storage_options=storage_options)
    except TableNotFoundError as e:
        raise DeltaLogError(f"{table_path} is not a Delta table: {e}") from e
    if version is not None:
        latest = table.version()
        if not 0 <= int(version) <= latest:
            raise DeltaLogError(f"{table_path}: no version {version} (latest is {latest})")
        try:
            table.load_as_version(int(version))
        except DeltaError as e:   # e.g. the version's commit is gone from the log (expired) and no checkpoint covers it
            raise DeltaLogError(f"{table_path}: version {version} cannot be read: {e}") from e
    return table


def latest_version(table_path, storage_options: dict | None = None) -> int:
    """The newest committed version of the Delta table at table_path."""
    return open_table(table_path, storage_options=storage_options).version()


def _literal(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return "'" + str(value).replace("'", "''") + "'"


def sql_predicate(filter: dict) -> str | None:
    """{"col": value or [values]} (all must hold) as the SQL predicate the engine evaluates per row."""
    if not isinstance(filter, dict):
        raise TypeError(f"filter must be a dict {{column: value or [values]}}, got {type(filter).__name__}")
    terms = []
    for column, value in filter.items():
        name = '"' + column.replace('"', '""') + '"'
        if isinstance(value, (list, tuple, set)):
            values = list(value)
            terms.append(f"{name} IN ({', '.join(map(_literal, values))})" if values else "false")
        else:
            terms.append(f"{name} = {_literal(value)}")
    return " AND ".join(terms) or None


def read_delta(table_path, version: int | None = None, columns: list[str] | None = None,
               filter: dict | None = None, storage_options: dict | None = None) -> pa.Table:
    """The Delta table at table_path as of version (None: latest), as a pyarrow Table in no particular row
    order. columns: the columns to read (default all, in table order); filter: {column: value or [values]},
    all of which must hold (files are skipped by partition values and statistics, rows filtered exactly)."""
    table = open_table(table_path, version, storage_options)
    schema = pa.schema(table.schema().to_arrow())
    wanted = list(columns) if columns is not None else schema.names
    unknown = [c for c in [*wanted, *(filter or {})] if c not in schema.names]
    if unknown:
        raise KeyError(f"{table_path} has no column(s) {unknown}; it has {schema.names}")
    predicate = sql_predicate(filter) if filter else None
    reader = pa.RecordBatchReader.from_stream(table.scan(columns=wanted, predicate=predicate))
    target = pa.schema([schema.field(c) for c in wanted])
    return reader.read_all().cast(target)
