"""The JVM-free Delta reader (deltalake) against tables written by real Spark/Delta 4.4, version by version,
including the protocol features delta-spark turns on (deletion vectors, v2 checkpoints, column mapping)."""
import json

import pytest

from bertxml.platform import tables as t
from bertxml.platform.deltaread import DeltaLogError, latest_version, read_delta, sql_predicate


def chunk_rows(note_ids, max_len, split="train"):
    return [(f"n{i}", split, max_len, 0, [2, i, 3], [i % 3], [1]) for i in note_ids]


def spark_rows(spark, path, version, max_len=None):
    df = spark.read.format("delta").option("versionAsOf", version).load(str(path))
    if max_len is not None:
        df = df.filter(df.max_len == max_len)
    return sorted((r.note_id, r.max_len, tuple(r.input_ids)) for r in df.collect())


def our_rows(path, version, **kw):
    table = read_delta(path, version, **kw)
    return sorted((r["note_id"], r["max_len"], tuple(r["input_ids"])) for r in table.to_pylist())


def delta_write(spark, path, rows, mode="overwrite", replace_where=None):
    writer = spark.createDataFrame(rows, t.CHUNKS_SCHEMA).write.format("delta").mode(mode)
    if replace_where:
        writer = writer.option("replaceWhere", replace_where)
    writer.save(str(path))


@pytest.fixture(scope="module")
def history(spark, tmp_path_factory):
    """A chunks-shaped table through appends, an overwrite and a replaceWhere (versions 0-5)."""
    path = tmp_path_factory.mktemp("deltaread") / "history"
    delta_write(spark, path, chunk_rows(range(0, 4), 512))                                         # v0
    delta_write(spark, path, chunk_rows(range(4, 6), 512), mode="append")                          # v1
    delta_write(spark, path, chunk_rows(range(6, 9), 1024), mode="append")                         # v2
    delta_write(spark, path, chunk_rows(range(10, 13), 512) + chunk_rows(range(10, 12), 1024))     # v3
    delta_write(spark, path, chunk_rows(range(20, 22), 512), replace_where="max_len = 512")         # v4
    delta_write(spark, path, chunk_rows(range(30, 31), 1024, split="dev"), mode="append")          # v5
    return path


def test_every_version_matches_spark(spark, history):
    for version in range(6):
        assert our_rows(history, version) == spark_rows(spark, history, version), version
    assert our_rows(history, 4) == [("n10", 1024, (2, 10, 3)), ("n11", 1024, (2, 11, 3)),
                                    ("n20", 512, (2, 20, 3)), ("n21", 512, (2, 21, 3))]
    assert latest_version(history) == 5
    assert latest_version(history) == spark.sql(f"DESCRIBE HISTORY delta.`{history}`").first().version
    assert read_delta(history).num_rows == 5            # latest by default


def test_columns_and_filters(spark, history):
    table = read_delta(history, 5, columns=["label_ids", "note_id"], filter={"max_len": 1024})
    assert table.column_names == ["label_ids", "note_id"]
    assert sorted(table.column("note_id").to_pylist()) == ["n10", "n11", "n30"]
    assert our_rows(history, 5, filter={"max_len": 512}) == spark_rows(spark, history, 5, max_len=512)
    both = read_delta(history, 5, filter={"max_len": [512, 1024], "split": "dev"})
    assert both.column("note_id").to_pylist() == ["n30"]
    some = read_delta(history, 5, columns=["note_id"], filter={"max_len": 512, "note_id": ["n20", "n99", "n1"]})
    assert some.column("note_id").to_pylist() == ["n20"]
    assert read_delta(history, 5, filter={"note_id": []}).num_rows == 0
    assert read_delta(history, 5, filter={"max_len": 256}).num_rows == 0
    schema = read_delta(history, 5).schema
    assert schema.field("input_ids").type.value_type.bit_width == 32
    assert str(schema.field("note_id").type) == "string"            # the table's type, not the engine's view


def test_filter_as_sql():
    assert sql_predicate({"max_len": 512, "split": ["train", "it's"]}) == \
        """"max_len" = 512 AND "split" IN ('train', 'it''s')"""
    with pytest.raises(TypeError, match="dict"):
        sql_predicate("max_len = 512")


def test_types_survive(spark, history):
    row = [r for r in read_delta(history, 0).to_pylist() if r["note_id"] == "n1"][0]
    assert row == {"note_id": "n1", "split": "train", "max_len": 512, "chunk_index": 0, "input_ids": [2, 1, 3],
                   "label_ids": [1], "sentence_starts": [1]}


def test_unknown_version_and_column(history):
    with pytest.raises(DeltaLogError, match="no version 9"):
        read_delta(history, 9)
    with pytest.raises(KeyError, match="nope"):
        read_delta(history, 0, columns=["nope"])
    with pytest.raises(KeyError, match="nada"):
        read_delta(history, 0, filter={"nada": 1})
    with pytest.raises(DeltaLogError, match="not a Delta table"):
        read_delta(history.parent / "missing")


def test_checkpoints(spark, tmp_path):
    """delta.checkpointInterval=2 makes Delta write checkpoint parquet files; replay starts from them."""
    path = tmp_path / "checkpointed"
    delta_write(spark, path, chunk_rows(range(0, 2), 512))                                         # v0
    spark.sql(f"ALTER TABLE delta.`{path}` SET TBLPROPERTIES ('delta.checkpointInterval' = '2')")   # v1
    delta_write(spark, path, chunk_rows(range(20, 22), 1024), mode="append")                        # v2
    delta_write(spark, path, chunk_rows(range(30, 32), 1024), replace_where="max_len = 1024")       # v3
    delta_write(spark, path, chunk_rows(range(40, 42), 512), mode="append")                         # v4
    log_dir = path / "_delta_log"
    assert sorted(int(p.name.split(".")[0]) for p in log_dir.glob("*.checkpoint*.parquet")) == [2, 4]
    assert json.loads((log_dir / "_last_checkpoint").read_text())["version"] == 4
    expected = {version: spark_rows(spark, path, version) for version in range(5)}
    assert [len(expected[v]) for v in range(5)] == [2, 2, 4, 4, 6]
    for version in range(5):
        assert our_rows(path, version) == expected[version], version

    # Once Delta's log clean-up removes old commits, the checkpoints alone serve the versions they cover.
    for old in range(0, 2):
        (log_dir / f"{old:020d}.json").unlink()
    for version in (2, 3, 4):
        assert our_rows(path, version) == expected[version], version
    with pytest.raises(DeltaLogError, match="version 1 cannot be read"):
        read_delta(path, 1)


def test_partitioned_table(spark, tmp_path):
    path = tmp_path / "partitioned"
    df = spark.createDataFrame(chunk_rows(range(0, 3), 512) + chunk_rows(range(3, 5), 1024), t.CHUNKS_SCHEMA)
    df.write.format("delta").partitionBy("max_len").save(str(path))
    table = read_delta(path, 0, filter={"max_len": 1024})
    assert sorted(table.column("note_id").to_pylist()) == ["n3", "n4"]
    assert set(table.column("max_len").to_pylist()) == {1024}
    assert our_rows(path, 0) == spark_rows(spark, path, 0)


def test_tables_with_deletion_vectors_v2_checkpoints_and_column_mapping(spark, tmp_path):
    """What delta-spark 4.4 writes once these features are on reads as Spark reads it, version by version."""
    features = {"dv": "'delta.enableDeletionVectors' = 'true'",
                "v2": "'delta.checkpointPolicy' = 'v2', 'delta.checkpointInterval' = '2'",
                "colmap": "'delta.columnMapping.mode' = 'name', 'delta.minReaderVersion' = '2', "
                          "'delta.minWriterVersion' = '5'"}
    for name, props in features.items():
        path = tmp_path / name
        delta_write(spark, path, chunk_rows(range(0, 6), 512))                                      # v0
        spark.sql(f"ALTER TABLE delta.`{path}` SET TBLPROPERTIES ({props})")                        # v1
        spark.sql(f"DELETE FROM delta.`{path}` WHERE note_id IN ('n1', 'n4')")                      # v2
        delta_write(spark, path, chunk_rows(range(6, 8), 1024), mode="append")                      # v3
        for version in range(4):
            assert our_rows(path, version) == spark_rows(spark, path, version), (name, version)
        assert [r[0] for r in our_rows(path, 3, filter={"max_len": 512})] == ["n0", "n2", "n3", "n5"], name
    log_dir = tmp_path / "dv" / "_delta_log"
    assert any('"deletionVector":{' in line for p in log_dir.glob("*.json") for line in p.read_text().splitlines())
    assert list((tmp_path / "v2" / "_delta_log").glob("*.checkpoint.*-*.*")), "no v2 checkpoint was written"
