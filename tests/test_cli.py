"""The CLI contract: --workdir/--conf/--set on every command, `sql --format json`, clear exit codes."""
import json

import numpy as np
import pytest

from bertxml.platform import tables as t
from bertxml.cli import build_parser, main
from bertxml.config import ConfigError
from bertxml.config_io import load_config


def test_every_command_takes_the_common_options():
    parser = build_parser()
    for command in ("generate", "etl", "sql", "demo"):
        argv = [command, "--workdir", "w", "--conf", "a.yaml", "--set", "etl.min_code_count=3"]
        args = parser.parse_args(argv + (["SELECT 1"] if command == "sql" else []))
        assert args.workdir == "w" and args.conf == ["a.yaml"] and args.set == ["etl.min_code_count=3"]


def test_config_overrides_are_typed_and_checked(tmp_path):
    conf = tmp_path / "c.yaml"
    conf.write_text("etl:\n  min_code_count: 7\n  split_salt: abc\n")
    cfg = load_config([str(conf)], ["etl.min_code_count=9", "train.bf16=false", "etl.drop_statuses=[a, b]"])
    assert cfg.etl.min_code_count == 9 and cfg.etl.split_salt == "abc" and cfg.train.bf16 == "false"
    assert cfg.etl.drop_statuses == ["a", "b"]
    with pytest.raises(ConfigError, match="unknown config key etl.min_count"):
        load_config(None, ["etl.min_count=1"])
    with pytest.raises(ConfigError, match="etl.min_code_count"):
        load_config(None, ["etl.min_code_count=many"])
    with pytest.raises(ConfigError, match="vocab.max_notes: must be at least 0"):
        load_config(None, ["vocab.max_notes=-5"])
    assert load_config(None, ["vocab.max_notes=200000"]).vocab.max_notes == 200_000
    with pytest.raises(ConfigError, match="spark.progress_seconds: must be at least 0"):
        load_config(None, ["spark.progress_seconds=-1"])
    assert load_config(None, None, size="small").model.hidden_size == 512


def test_sql_json_prints_one_object_per_row(wh, spark, capsys):
    import datetime as dt

    rows = [("P1", "E1", "I10", dt.date(2024, 1, 2)), ("P2", "E2", "E11.9", dt.date(2024, 3, 4))]
    wh.write(spark.createDataFrame(rows, t.DIAGNOSES_SCHEMA), "ehr.diagnoses")
    code = main(["sql", "--workdir", str(wh.workdir), "--format", "json",
                 "SELECT patient_id, diagnosis_date, array(icd10_code) AS codes FROM ehr.diagnoses ORDER BY patient_id"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert code == 0
    assert [json.loads(line) for line in lines] == [
        {"patient_id": "P1", "diagnosis_date": "2024-01-02", "codes": ["I10"]},
        {"patient_id": "P2", "diagnosis_date": "2024-03-04", "codes": ["E11.9"]}]


def test_sql_bad_query_exits_nonzero_with_sparks_message(wh, capsys):
    code = main(["sql", "--workdir", str(wh.workdir), "SELECT * FROM bertxml.no_such_table"])
    assert code == 1
    assert "no_such_table" in capsys.readouterr().err


def test_bad_config_exits_2(wh, capsys):
    assert main(["sql", "--workdir", str(wh.workdir), "--set", "nope.x=1", "SELECT 1"]) == 2
    assert "unknown config section 'nope'" in capsys.readouterr().err


def test_as_of_version_is_refused_with_its_replacement(capsys):
    for command in ("etl", "retrain"):
        with pytest.raises(SystemExit) as stop:
            main([command, "--as-of-version", "3"])
        assert stop.value.code == 2
        assert "--as-of-version was removed" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        main(["etl", "--as-of-run", "etl-x", "--as-of-timestamp", "2024-01-01"])
    assert stop.value.code == 2


def test_as_of_an_unknown_run_exits_2_naming_it(wh, capsys):
    assert main(["etl", "--workdir", str(wh.workdir), "--as-of-run", "etl-20240101T000000-abcdef"]) == 2
    assert "run etl-20240101T000000-abcdef is not in bertxml.job_runs" in capsys.readouterr().err


def test_train_starts_from_train_init_and_init_overrides_it(wh, tmp_path, caplog):
    """`bertxml train` honours train.init from the config as `retrain` does; --init replaces it for one run."""
    missing = tmp_path / "no-checkpoint"
    assert main(["train", "--workdir", str(wh.workdir), "--set", f"train.init={missing}"]) == 1
    assert f"train.init {str(missing)!r}: no config.json there" in caplog.text
    caplog.clear()
    assert main(["train", "--workdir", str(wh.workdir), "--init", str(missing / "other")]) == 1
    assert "no-checkpoint/other" in caplog.text and "no config.json there" in caplog.text


def test_sql_table_prints_float_columns_as_their_own_digits():
    from bertxml.platform.sql import float_text, format_rows

    assert float_text(float(np.float32(0.333))) == "0.333"       # a FLOAT column's value
    assert float_text(0.8444444444444444) == "0.8444444444444444"  # a DOUBLE keeps every digit
    assert float_text(598.0) == "598.0" and float_text(float("nan")) == "nan"
    out = format_rows(["w"], [(float(np.float32(0.304)),)], "table")
    assert out.splitlines()[2] == "0.304"

