"""`bertxml retrain`: the retraining story in one command, from the warehouse as it stands or as of a
Delta snapshot: ETL -> vocabulary -> tokens/chunks -> pretraining -> fine-tuning -> dev evaluation.

    bertxml retrain [--as-of-version V | --as-of-timestamp T] [--conf conf/codiesp.yaml] [--size small]

The config decides sizes and steps; the new model folder's manifest records every input's Delta version.
"""
from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger("bertxml.retrain")


def run_retrain(wh, cfg, as_of_version: int | None = None, as_of_timestamp: str | None = None,
                notes_source: str | None = None, diagnoses_source: str | None = None,
                out_dir: str | None = None, model_kind: str = "bertxml") -> Path:
    """Run every step in order and return the new model folder."""
    from bertxml.etl import run_etl
    from bertxml.evaluate import run_evaluate
    from bertxml.pretrain import run_pretrain
    from bertxml.tokenize import run_tokenize
    from bertxml.train import run_train
    from bertxml.vocab import run_vocab

    steps = 6
    log.info("retrain 1/%d: ETL%s", steps, f" as of version {as_of_version}" if as_of_version is not None
             else f" as of {as_of_timestamp}" if as_of_timestamp else "")
    run_etl(wh, cfg, notes_source, diagnoses_source, as_of_version, as_of_timestamp)
    vocab_dir = wh.workdir / "vocab"
    log.info("retrain 2/%d: vocabulary (%d WordPieces) into %s", steps, cfg.vocab.size, vocab_dir)
    run_vocab(wh, cfg, cfg.vocab.corpus, vocab_dir)
    log.info("retrain 3/%d: tokens and chunks of %d", steps, cfg.model.max_len)
    run_tokenize(wh, cfg, vocab_dir, cfg.model.max_len)
    log.info("retrain 4/%d: pretraining (MLM + NSP)", steps)
    encoder_dir = run_pretrain(wh, cfg, vocab_dir, None, cfg.vocab.corpus)
    log.info("retrain 5/%d: fine-tuning %s from %s", steps, model_kind, encoder_dir)
    model_dir = run_train(wh, cfg, model_kind=model_kind, encoder_dir=encoder_dir, out_dir=out_dir)
    log.info("retrain 6/%d: dev evaluation of %s", steps, model_dir)
    run_evaluate(wh, cfg, split="dev", model_dir=model_dir)
    log.info("retrain done: %s", model_dir)
    return Path(model_dir)
