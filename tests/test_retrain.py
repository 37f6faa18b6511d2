"""`bertxml retrain --as-of-run`: a model retrained from an earlier ETL run's snapshot, after the warehouse
grew, is trained on that run's rows, and its manifest names the run and the versions it read.

Run: .venv/bin/python -m pytest -q tests/test_retrain.py
"""
import json

from bertxml.models import modeldir
from bertxml.cli import main
from bertxml.etl.etl import run_etl
from test_etl import first_snapshot, growth, table_rows, write_inputs

TINY = """
etl: {min_code_count: 0}
vocab: {size: 120, min_frequency: 1, oov_notes: 4}
model: {hidden_size: 32, num_hidden_layers: 2, num_attention_heads: 2, intermediate_size: 64,
        max_position_embeddings: 64, max_len: 32}
pretrain: {max_steps: 1, batch_size: 4, max_len: 32, threads: 1, bf16: false, dev_batches: 1, log_every: 1}
train: {max_steps: 2, batch_size: 4, threads: 1, bf16: false, checkpoint_every: 0, eval_batch_size: 16}
spark: {shuffle_partitions: 2}
mlflow: {log_runs: false}  # covered by tests/test_registry.py and tests/test_phi.py
"""


def test_retrain_as_of_run_trains_on_that_runs_rows_and_says_so(wh, spark, tmp_path, capsys):
    conf = tmp_path / "tiny.yaml"
    conf.write_text(TINY)
    wh.cfg.etl.min_code_count = 0
    write_inputs(wh, spark, first_snapshot())
    first = run_etl(wh, wh.cfg)
    labeled = "bertxml.labeled_notes"
    first_notes = table_rows(wh, labeled, first["outputs"][labeled])
    write_inputs(wh, spark, growth(), mode="append")  # changes old notes' labels (see test_etl)

    assert main(["retrain", "--workdir", str(wh.workdir), "--conf", str(conf), "--as-of-run", first["run_id"]]) == 0
    model_dir = capsys.readouterr().out.strip().splitlines()[-1]
    assert table_rows(wh, labeled) == first_notes
    manifest = modeldir.load_manifest(model_dir)
    replay = json.loads(spark.sql(f"DESCRIBE HISTORY {labeled} LIMIT 1").first().userMetadata)["run_id"]
    assert manifest["etl_run"]["run_id"] == replay != first["run_id"]
    assert manifest["etl_run"]["labeled_notes_version"] == manifest["inputs"][labeled] == wh.version(labeled)
    assert {k: (v["source"], v["version"], v["as_of_run"]) for k, v in manifest["etl_run"]["inputs"].items()} == \
        {"notes": ("ehr.notes", 0, first["run_id"]), "diagnoses": ("ehr.diagnoses", 0, first["run_id"])}
    assert wh.version("ehr.notes") == wh.version("ehr.diagnoses") == 1  # the tables had grown
