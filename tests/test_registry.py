"""Tests for bertxml/models/registry.py: models logged to the embedded MLflow store (SQLite under the workdir),
registered, promoted and resolved by alias; the pyfunc model through `mlflow.pyfunc.spark_udf` gives the
probabilities `bertxml score` writes; a champion and a challenger scored and evaluated side by side.

One test builds the whole story on two tiny model folders: the store's first use (creating its tables)
is the slow part, so it is paid once.
"""
import datetime as dt
import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_evaluate import NOTES  # noqa: E402
from test_score import CODES, make_model_dir  # noqa: E402

from bertxml.models import registry  # noqa: E402
from bertxml.platform import tables as t  # noqa: E402
from bertxml.reports.evaluate import run_evaluate_aliases  # noqa: E402
from bertxml.scoring.score import run_score  # noqa: E402

D1 = dt.date(2025, 3, 1)


def test_parse_model_uri():
    assert registry.parse_model_uri("models:/bertxml@champion") == ("bertxml", "champion", None)
    assert registry.parse_model_uri("models:/main.icd.bertxml/12") == ("main.icd.bertxml", None, "12")
    for bad in ("models:/bertxml", "models:/bertxml@", "bertxml@champion", "models:/a/b/c"):
        with pytest.raises(registry.RegistryError, match="not a registered model URI"):
            registry.parse_model_uri(bad)


def test_flatten_config_and_lineage_tags():
    assert registry.flatten_config({"train": {"lr": 0.001, "bf16": "auto"}, "compare": {"models": ["a", "b"]}}) == \
        {"train.lr": "0.001", "train.bf16": "auto", "compare.models": "['a', 'b']"}
    manifest = {"model_version": "v1", "model_kind": "bertxml", "code_version": "0.1.0",
                "inputs": {"bertxml.chunks": 4, "bertxml.labeled_notes": 2},
                "etl_run": {"run_id": "etl-1", "inputs": {"notes": {"source": "ehr.notes", "version": 7}}}}
    tags = registry.run_tags(manifest, "train", "train-9")
    assert tags["bertxml.input.bertxml.chunks"] == "4" and tags["bertxml.etl_run_id"] == "etl-1"
    assert tags["bertxml.etl_input.notes"] == "ehr.notes@7" and tags["bertxml.job_run_id"] == "train-9"
    assert registry.dev_metric_values({"macro_auc": 0.8, "best_step": None, "history": [], "notes": 4}) == \
        {"dev_macro_auc": 0.8, "dev_notes": 4.0}


def test_register_promote_score_by_alias_and_spark_udf_parity(wh, cfg, spark):
    import mlflow
    from pyspark.sql import functions as F

    models = wh.workdir / "models"
    champion_dir = make_model_dir(models, version="bertxml-test-a", seed=0)
    challenger_dir = make_model_dir(models, version="bertxml-test-b", seed=1)
    manifest = json.loads((champion_dir / "manifest.json").read_text())
    manifest.update(config={"train": {"lr": 0.001}}, dev_metrics={"macro_auc": 0.75, "micro_auc": 0.8},
                    inputs={"bertxml.chunks": 3}, etl_run={"run_id": "etl-test", "inputs": {}})
    (champion_dir / "manifest.json").write_text(json.dumps(manifest))

    # No registry yet: the nightly default is the newest folder, and mlflow is not even asked.
    assert not registry.registry_configured(cfg, wh.workdir)
    assert registry.resolve_model(cfg, wh.workdir).model_dir == challenger_dir.resolve()

    first = registry.log_model_run(cfg, wh.workdir, champion_dir, "train", job_run_id="train-1")
    second = registry.log_model_run(cfg, wh.workdir, challenger_dir, "compare")
    assert (first.version, second.version) == ("1", "2")
    assert (wh.workdir / "mlflow" / "mlflow.db").exists()           # the embedded store, under the workdir
    run = registry.client(cfg, wh.workdir).get_run(first.run_id)
    assert run.data.params["train.lr"] == "0.001" and run.data.metrics["dev_macro_auc"] == 0.75
    assert run.data.tags["bertxml.input.bertxml.chunks"] == "3" and run.data.tags["bertxml.etl_run_id"] == "etl-test"
    assert registry.registered_version_of(cfg, wh.workdir, challenger_dir) == "2"

    # A registry without the alias: the embedded one falls back to the newest folder; a configured one fails.
    assert registry.resolve_model(cfg, wh.workdir).model_dir == challenger_dir.resolve()
    with pytest.raises(registry.RegistryError, match="no alias 'champion'"):
        registry.resolve_model(cfg, wh.workdir, "models:/bertxml@champion")

    promoted = registry.run_promote(wh, cfg, "1", alias="champion")
    assert promoted["previous_version"] is None and promoted["promoted_by"]
    registry.run_promote(wh, cfg, "2", alias="challenger")
    with pytest.raises(registry.RegistryError, match="no version 9"):
        registry.run_promote(wh, cfg, "9", alias="champion")
    rows = wh.table(wh.name(t.JOB_RUNS)).filter("job = 'promote' AND status = 'succeeded'").collect()
    assert sorted((json.loads(r.counts)["alias"], json.loads(r.counts)["version"]) for r in rows) == \
        [("challenger", "2"), ("champion", "1")]
    assert {json.loads(r.counts)["model_version"] for r in rows} == {"bertxml-test-a", "bertxml-test-b"}

    # Alias resolution: the default is the champion now; a version number and the challenger resolve too.
    default = registry.resolve_model(cfg, wh.workdir)
    assert default.alias == "champion" and default.version == "1"
    assert json.loads((default.model_dir / "manifest.json").read_text())["model_version"] == "bertxml-test-a"
    assert registry.resolve_model(cfg, wh.workdir, "models:/bertxml/2").model_dir.name == "bertxml-test-b"
    configured = type(cfg)()
    configured.mlflow.tracking_uri = registry.tracking_uri(cfg, wh.workdir)
    configured.score.default_alias = "gold"
    with pytest.raises(registry.RegistryError, match="no alias 'gold'"):
        registry.resolve_model(configured, wh.workdir)

    # Champion and challenger score the same night; their rows sit side by side (keyed by model_version).
    notes = [(i, p, e, d, "progress_note", "physician", "final", text) for i, p, e, d, text, _ in NOTES]
    diag = [(p, e, c, d) for _, p, e, d, _, codes in NOTES for c in codes]
    wh.write(spark.createDataFrame(notes, t.NOTES_SCHEMA), "ehr.notes")
    wh.write(spark.createDataFrame(diag, t.DIAGNOSES_SCHEMA), "ehr.diagnoses")
    cfg.score.partitions = 1
    cfg.score.cpu_bf16 = "false"
    champ = run_score(wh, cfg, date=D1)                              # the nightly default: the champion
    chall = run_score(wh, cfg, date=D1, model_dir="models:/bertxml@challenger")
    assert champ["model_version"] == "bertxml-test-a" and chall["model_version"] == "bertxml-test-b"
    preds = wh.table(wh.name(t.PREDICTIONS)).collect()
    assert sorted((r.model_version, r.note_id) for r in preds) == sorted(
        (v, n[0]) for v in ("bertxml-test-a", "bertxml-test-b") for n in NOTES if n[3] == D1)
    score_run = wh.table(wh.name(t.JOB_RUNS)).filter(F.col("run_id") == chall["run_id"]).collect()[0]
    assert json.loads(score_run.inputs)["model"]["alias"] == "challenger"

    # The registered pyfunc through Spark gives the probabilities `bertxml score` wrote.
    udf = mlflow.pyfunc.spark_udf(spark, "models:/bertxml@champion", result_type="array<float>",
                                  env_manager="local")
    by_udf = {r.note_id: r.p for r in wh.table("ehr.notes").filter(F.col("note_date") == F.lit(D1))
              .select("note_id", udf("text").alias("p")).collect()}
    scored = {r.note_id: r.probabilities for r in preds if r.model_version == "bertxml-test-a"}
    assert by_udf.keys() == scored.keys()
    # fp32 both ways, but batched differently (the UDF's Arrow batches, the job's length buckets), and the
    # Python workers' torch threads depend on what ran in them before: float noise up to ~1e-5 is expected.
    for note_id, probs in scored.items():
        assert len(by_udf[note_id]) == len(CODES)
        np.testing.assert_allclose(by_udf[note_id], probs, atol=5e-5)
    challenger_probs = {r.note_id: r.probabilities for r in preds if r.model_version == "bertxml-test-b"}
    # two different models (tiny and random: their probabilities differ little, but they differ), and the
    # UDF's are the champion's, not the challenger's, even at that tolerance
    assert any(np.abs(np.array(challenger_probs[n]) - np.array(scored[n])).max() > 0 for n in scored)
    off = {name: sum(np.abs(np.array(by_udf[n]) - np.array(rows[n])).sum() for n in scored)
           for name, rows in (("champion", scored), ("challenger", challenger_probs))}
    assert off["champion"] < off["challenger"], off

    # evaluate --compare champion,challenger: both models' reports of the night in bertxml.auc_report.
    result = run_evaluate_aliases(wh, cfg, "champion,challenger", date_from=D1, date_to=D1)
    report = {(r.model_version, r.dataset): r for r in wh.table(wh.name(t.AUC_REPORT)).collect()}
    assert set(report) == {("bertxml-test-a", "date:2025-03-01"), ("bertxml-test-b", "date:2025-03-01")}
    assert result["aliases"]["challenger"]["registered_version"] == "2"
    assert "| date:2025-03-01 |" in result["markdown"]
    with pytest.raises(ValueError, match="two or more different aliases"):
        run_evaluate_aliases(wh, cfg, "champion", date_from=D1, date_to=D1)
