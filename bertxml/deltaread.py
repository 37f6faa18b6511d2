"""Read a Delta table at a pinned version without Spark or a JVM: training's reader for `bertxml.chunks`.

    from bertxml.deltaread import read_delta
    table = read_delta(wh.path("bertxml.chunks"), version=7, columns=["input_ids", "label_ids"],
                       filter={"max_len": 512, "split": ["train"]})

The Delta transaction log (`_delta_log/`) is replayed by hand, as the Delta protocol describes: start from
the newest checkpoint at or below the version (`_last_checkpoint` names the newest; classic single-file
and multi-part `NNN.checkpoint[.i.n].parquet`, and v2 `NNN.checkpoint.<uuid>.parquet|json` with sidecars),
then apply each commit `NNN.json` up to the version: an `add` makes a data file active, a `remove` drops it.
The active parquet files are read with pyarrow. Partition columns are filled in from the log.

Not supported (they raise `NotImplementedError`, never a silently wrong read): deletion vectors and
column mapping, neither of which the project's tables use.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from urllib.parse import unquote, urlparse

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

_COMMIT = re.compile(r"^(\d{20})\.json$")
_CHECKPOINT = re.compile(r"^(\d{20})\.checkpoint(?:\.(\d{10})\.(\d{10})|\.([0-9a-fA-F-]{36}))?\.(parquet|json)$")


class DeltaLogError(ValueError):
    """A Delta log that cannot be read at the asked version (missing, truncated, or not a Delta table)."""


def _log_dir(table_path) -> Path:
    log_dir = Path(table_path) / "_delta_log"
    if not log_dir.is_dir():
        raise DeltaLogError(f"{table_path} is not a Delta table (no _delta_log)")
    return log_dir


def _listing(log_dir: Path) -> tuple[dict[int, Path], dict[int, list[Path]]]:
    """(version -> commit file, version -> checkpoint files of one complete checkpoint)."""
    commits: dict[int, Path] = {}
    parts: dict[tuple[int, str], list[tuple[int, int, Path]]] = {}
    for path in log_dir.iterdir():
        m = _COMMIT.match(path.name)
        if m:
            commits[int(m.group(1))] = path
            continue
        m = _CHECKPOINT.match(path.name)
        if m:
            version = int(m.group(1))
            if m.group(2):                                   # multi-part: part i of n
                key = (version, f"multi-{int(m.group(3))}")
                parts.setdefault(key, []).append((int(m.group(2)), int(m.group(3)), path))
            else:                                            # classic single file, or v2 (uuid)
                parts.setdefault((version, path.name), []).append((1, 1, path))
    checkpoints: dict[int, list[Path]] = {}
    for (version, _), files in sorted(parts.items()):
        n = files[0][1]
        if len(files) == n and sorted(i for i, _, _ in files) == list(range(1, n + 1)):
            checkpoints.setdefault(version, [p for _, _, p in sorted(files)])   # an incomplete one is skipped
    return commits, checkpoints


def _read_json_actions(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _checkpoint_actions(files: list[Path], log_dir: Path) -> list[dict]:
    """The actions a checkpoint holds (plus, for a v2 checkpoint, those of its sidecar files)."""
    actions: list[dict] = []
    for path in files:
        if path.suffix == ".json":
            rows = _read_json_actions(path)
        else:
            table = pq.read_table(path)
            wanted = [c for c in ("add", "remove", "metaData", "protocol", "sidecar") if c in table.column_names]
            rows = table.select(wanted).to_pylist()
        for row in rows:
            _map_fields_to_dicts(row)
            if row.get("sidecar"):
                sidecar = log_dir / "_sidecars" / unquote(row["sidecar"]["path"])
                actions.extend(_checkpoint_actions([sidecar], log_dir))
            actions.extend({k: v} for k, v in row.items() if v is not None and k != "sidecar")
    return actions


def _map_fields_to_dicts(row: dict) -> None:
    """pyarrow reads a checkpoint's MAP columns as lists of (key, value) pairs; the JSON log has objects."""
    def fix(action, *keys):
        for key in keys[:-1]:
            action = (action or {}).get(key)
        if isinstance(action, dict) and isinstance(action.get(keys[-1]), list):
            action[keys[-1]] = dict(action[keys[-1]])

    for kind in ("add", "remove"):
        fix(row.get(kind), "partitionValues")
        fix(row.get(kind), "tags")
    fix(row.get("metaData"), "configuration")
    fix(row.get("metaData"), "format", "options")


def _data_path(table_path: Path, path: str) -> str:
    """An add/remove path (URL-encoded, relative to the table, or an absolute URI) as a local path."""
    parsed = urlparse(path)
    if parsed.scheme == "file":
        return unquote(parsed.path)
    if parsed.scheme:
        return path  # another filesystem: pyarrow resolves the URI
    return str(table_path / unquote(path))


def _snapshot(table_path, version: int | None) -> tuple[int, dict[str, dict], dict]:
    """(version, {data path -> add action}, metaData action) of the table at version (None: latest)."""
    table_path = Path(table_path).resolve()
    log_dir = _log_dir(table_path)
    commits, checkpoints = _listing(log_dir)
    if not commits and not checkpoints:
        raise DeltaLogError(f"{table_path}: the Delta log holds no commits")
    latest = max([*commits, *checkpoints])
    hint = log_dir / "_last_checkpoint"
    if hint.exists():  # the newest checkpoint may be newer than any commit JSON still kept
        try:
            latest = max(latest, int(json.loads(hint.read_text())["version"]))
        except (ValueError, KeyError):
            pass
    if version is None:
        version = latest
    version = int(version)
    if version < 0 or version > latest:
        raise DeltaLogError(f"{table_path}: no version {version} (latest is {latest})")

    base = max((v for v in checkpoints if v <= version), default=-1)
    active: dict[str, dict] = {}
    metadata: dict = {}
    if base >= 0:
        for action in _checkpoint_actions(checkpoints[base], log_dir):
            if "add" in action:
                active[action["add"]["path"]] = action["add"]
            elif "metaData" in action:
                metadata = action["metaData"]
    missing = [v for v in range(base + 1, version + 1) if v not in commits]
    if missing:
        raise DeltaLogError(f"{table_path}: commits {missing[:5]} of version {version} are gone from the log "
                            "(vacuumed or expired) and no checkpoint covers them")
    for v in range(base + 1, version + 1):
        for action in _read_json_actions(commits[v]):
            if "add" in action:
                active[action["add"]["path"]] = action["add"]
            elif "remove" in action:
                active.pop(action["remove"]["path"], None)
            elif "metaData" in action:
                metadata = action["metaData"]
    if not metadata:
        raise DeltaLogError(f"{table_path}: no metaData action up to version {version}")
    mode = (metadata.get("configuration") or {}).get("delta.columnMapping.mode", "none")
    if mode != "none":
        raise NotImplementedError(f"{table_path}: column mapping mode {mode!r} is not supported")
    for add in active.values():
        if add.get("deletionVector"):
            raise NotImplementedError(f"{table_path}: version {version} has deletion vectors; "
                                      "read it with Spark or disable delta.enableDeletionVectors")
    files = {_data_path(table_path, p): add for p, add in active.items()}
    return version, dict(sorted(files.items())), metadata


def delta_files(table_path, version: int | None = None) -> tuple[int, list[str]]:
    """(version, active parquet files) of the Delta table at table_path at version (None: latest)."""
    version, files, _ = _snapshot(table_path, version)
    return version, list(files)


# ---- schema ------------------------------------------------------------------------------------------------
_PRIMITIVES = {"string": pa.string(), "long": pa.int64(), "integer": pa.int32(), "short": pa.int16(),
               "byte": pa.int8(), "float": pa.float32(), "double": pa.float64(), "boolean": pa.bool_(),
               "binary": pa.binary(), "date": pa.date32(), "timestamp": pa.timestamp("us", tz="UTC"),
               "timestamp_ntz": pa.timestamp("us")}


def _arrow_type(delta_type) -> pa.DataType:
    if isinstance(delta_type, str):
        if delta_type in _PRIMITIVES:
            return _PRIMITIVES[delta_type]
        m = re.fullmatch(r"decimal\((\d+),\s*(\d+)\)", delta_type)
        if m:
            return pa.decimal128(int(m.group(1)), int(m.group(2)))
        raise NotImplementedError(f"Delta type {delta_type!r}")
    kind = delta_type["type"]
    if kind == "array":
        return pa.list_(pa.field("element", _arrow_type(delta_type["elementType"]),
                                 delta_type.get("containsNull", True)))
    if kind == "map":
        return pa.map_(_arrow_type(delta_type["keyType"]), _arrow_type(delta_type["valueType"]))
    if kind == "struct":
        return pa.struct([pa.field(f["name"], _arrow_type(f["type"]), f.get("nullable", True))
                          for f in delta_type["fields"]])
    raise NotImplementedError(f"Delta type {kind!r}")


def arrow_schema(metadata: dict) -> pa.Schema:
    """The table schema of a metaData action, as pyarrow types."""
    fields = json.loads(metadata["schemaString"])["fields"]
    return pa.schema([pa.field(f["name"], _arrow_type(f["type"]), f.get("nullable", True)) for f in fields])


def _partition_value(raw, typ: pa.DataType):
    if raw is None:
        return pa.scalar(None, typ)
    return pa.scalar(raw).cast(typ) if not pa.types.is_string(typ) else pa.scalar(raw, typ)


# ---- filters -----------------------------------------------------------------------------------------------
def _as_expression(filter) -> ds.Expression | None:
    """{"col": value or [values]} (all must hold) or a pyarrow.dataset expression."""
    if filter is None or isinstance(filter, ds.Expression):
        return filter
    if not isinstance(filter, dict):
        raise TypeError(f"filter must be a dict or a pyarrow.dataset expression, got {type(filter).__name__}")
    expr = None
    for column, value in filter.items():
        term = (pc.field(column).isin(list(value)) if isinstance(value, (list, tuple, set))
                else pc.field(column) == value)
        expr = term if expr is None else expr & term
    return expr


def _may_match(add: dict, filter, partition_columns: list[str]) -> bool:
    """False when the file's partition values or min/max statistics rule a dict filter out."""
    if not isinstance(filter, dict):
        return True
    stats = json.loads(add["stats"]) if add.get("stats") else {}
    lows, highs = stats.get("minValues", {}), stats.get("maxValues", {})
    for column, value in filter.items():
        wanted = list(value) if isinstance(value, (list, tuple, set)) else [value]
        if column in partition_columns:
            raw = (add.get("partitionValues") or {}).get(column)
            if raw is not None and all(str(w) != raw for w in wanted):
                return False
        elif column in lows and column in highs:
            lo, hi = lows[column], highs[column]
            try:
                if all(not (lo <= w <= hi) for w in wanted if w is not None):
                    return False
            except TypeError:   # a filter value of another type than the statistic: read the file
                continue
    return True


def read_delta(table_path, version: int | None = None, columns: list[str] | None = None,
               filter=None) -> pa.Table:
    """The Delta table at table_path as of version (None: latest), as a pyarrow Table.

    columns: the columns to read (default all, in table order); filter: a dict {column: value or [values]}
    (which also skips files by partition values and min/max statistics) or a pyarrow.dataset expression.
    """
    version, files, metadata = _snapshot(table_path, version)
    schema = arrow_schema(metadata)
    partition_columns = list(metadata.get("partitionColumns") or [])
    wanted = list(columns) if columns is not None else schema.names
    unknown = [c for c in wanted if c not in schema.names]
    if unknown:
        raise KeyError(f"{table_path} has no column(s) {unknown}; it has {schema.names}")
    expr = _as_expression(filter)
    needed = set(wanted) | (set(filter) if isinstance(filter, dict) else set(schema.names) if expr is not None
                            else set())
    pieces = []
    for path, add in files.items():
        if not _may_match(add, filter, partition_columns):
            continue
        file_schema = pq.read_schema(path)
        data_columns = [c for c in schema.names if c in needed and c not in partition_columns]
        present = [c for c in data_columns if c in file_schema.names]
        table = pq.read_table(path, columns=present)
        for name in data_columns:                      # a column added after this file was written
            if name not in present:
                table = table.append_column(name, pa.nulls(table.num_rows, schema.field(name).type))
        for name in partition_columns:
            if name in needed:
                value = _partition_value((add.get("partitionValues") or {}).get(name), schema.field(name).type)
                table = table.append_column(name, pa.array([value.as_py()] * table.num_rows,
                                                           schema.field(name).type))
        target = pa.schema([schema.field(c) for c in schema.names if c in needed])
        table = table.select(target.names).replace_schema_metadata(None)
        if not table.schema.equals(target):
            # Spark may write timestamps as INT96 (ns) or name list items otherwise: one schema for all files.
            table = table.cast(target, safe=False)
        if expr is not None:
            table = ds.dataset(table).to_table(filter=expr)
        pieces.append(table)
    target = pa.schema([schema.field(c) for c in schema.names if c in needed])
    result = pa.concat_tables(pieces) if pieces else target.empty_table()
    return result.select(wanted)
