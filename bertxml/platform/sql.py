"""Printing query results for `bertxml sql`: an aligned table, CSV, or one JSON object per row per line."""
from __future__ import annotations

import csv
import datetime as dt
import decimal
import io
import json

import numpy as np
from pyspark.sql import Row


def _plain(value):
    """Spark values as JSON-friendly Python: Rows to dicts, dates to ISO strings, decimals to floats."""
    if isinstance(value, Row):
        return {k: _plain(v) for k, v in value.asDict().items()}
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (dt.date, dt.datetime)):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return float(value)
    return value


def _cell(value) -> str:
    value = _plain(value)
    if value is None:
        return "NULL"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    if isinstance(value, float):
        return float_text(value)
    return str(value)


def float_text(value: float) -> str:
    """A float for the table and CSV formats. A FLOAT column's value reaches Python as its float32 widened to
    a double (0.333 as 0.3330000042915344); such a value prints as the float32's shortest digits. Any other
    double prints as Python does."""
    single = np.float32(value)
    return str(single) if np.isfinite(single) and float(single) == value else repr(value)


def format_rows(columns: list[str], rows: list[Row], fmt: str = "table") -> str:
    if fmt == "json":
        return "".join(json.dumps({c: _plain(r[i]) for i, c in enumerate(columns)}) + "\n" for r in rows)
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows([[_cell(v) for v in r] for r in rows])
        return out.getvalue()
    if fmt != "table":
        raise ValueError(f"unknown format {fmt!r}: use table, csv or json")
    cells = [[_cell(v) for v in r] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    line = lambda vals: " | ".join(v.ljust(w) for v, w in zip(vals, widths)).rstrip()  # noqa: E731
    body = [line(columns), "-+-".join("-" * w for w in widths)] + [line(r) for r in cells]
    return "\n".join(body) + f"\n({len(rows)} row{'s' if len(rows) != 1 else ''})\n"
