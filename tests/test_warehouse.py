"""Tests for bertxml/platform/warehouse.py: a replaceWhere write leaves its scope holding exactly the new rows.

Run: .venv/bin/python -m pytest -q tests/test_warehouse.py
"""
import datetime as dt

import pytest
from delta.tables import DeltaTable

D1, D2 = dt.date(2025, 3, 1), dt.date(2025, 3, 2)
SCHEMA = "note_id STRING, note_date DATE, model_version STRING, p DOUBLE"
SCOPE = "model_version = 'a' AND note_date IN (DATE'2025-03-01')"


@pytest.mark.parametrize("partition_by", [("note_date",), ()], ids=["partitioned", "unpartitioned (earlier bertxml)"])
def test_replace_where_replaces_its_scope_only(wh, partition_by):
    spark, name = wh.spark, "bertxml.scored"
    old = [("n1", D1, "a", 0.1), ("n2", D1, "a", 0.2), ("n3", D1, "a", 0.3),   # the night, model a
           ("n1", D1, "b", 0.9), ("m1", D2, "a", 0.5)]                          # another model, another night
    wh.write(spark.createDataFrame(old, SCHEMA), name, partition_by=partition_by)
    layout = DeltaTable.forPath(spark, str(wh.path(name))).detail().first().partitionColumns
    assert layout == list(partition_by)

    new = [("n1", D1, "a", 0.15), ("n4", D1, "a", 0.4)]   # n1 rescored, n4 new, n2 and n3 no longer scored
    version = wh.write(spark.createDataFrame(new, SCHEMA), name, replace_where=SCOPE, partition_by=("note_date",))
    rows = sorted(tuple(r) for r in wh.table(name).collect())
    assert rows == sorted([("n1", D1, "a", 0.15), ("n4", D1, "a", 0.4), ("n1", D1, "b", 0.9), ("m1", D2, "a", 0.5)])
    assert DeltaTable.forPath(spark, str(wh.path(name))).history(1).first().version == version
    assert DeltaTable.forPath(spark, str(wh.path(name))).detail().first().partitionColumns == list(partition_by)

    # An empty source empties the scope, and nothing else.
    wh.write(spark.createDataFrame([], SCHEMA), name, replace_where=SCOPE)
    assert sorted(tuple(r) for r in wh.table(name).collect()) == sorted([("n1", D1, "b", 0.9), ("m1", D2, "a", 0.5)])
