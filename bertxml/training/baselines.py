"""Training the paper's baselines (`bertxml train --model logreg|bilstm`): inputs pinned as
`bertxml.training.inputs.resolve_train_inputs` pins them, each note's FIRST chunk of `baseline.max_len`
tokens, the fit, dev thresholds and operating points, and the model folder (model_kind "logreg" |
"bilstm"). The models themselves are in `bertxml.models.logreg`, `bigru` and `starspace`.
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import safetensors.numpy
import torch
from tokenizers import Tokenizer

from bertxml.config import Config
from bertxml.config_io import config_from_dict
from bertxml.metrics import auc_metrics, fmt_metric, micro_f1
from bertxml.models import modeldir
from bertxml.models.baselines import KINDS
from bertxml.models.bigru import BiGruAttention, bilstm_probabilities, save_bilstm
from bertxml.models.logreg import bag_of_words, fit_one_vs_rest, idf_weights, logreg_probabilities, weight_features
from bertxml.models.modeldir import CONFIG_FILE, WEIGHTS_FILE
from bertxml.models.precision import autocast, decide_precision
from bertxml.models.profile import add_dev_reference
from bertxml.models.registry import log_job_model
from bertxml.models.starspace import train_starspace
from bertxml.platform.deltaread import read_delta
from bertxml.platform.runs import job_run
from bertxml.text.data import ChunkSet, bucketed_batches, coding_batch
from bertxml.training.inputs import resolve_train_inputs
from bertxml.training.loop import make_optimizer, pick_device, planned_steps, selection_score, set_threads
from bertxml.training.thresholds import operating_points, tune_thresholds

log = logging.getLogger("bertxml.training.baselines")


def _chunk_table(inputs):
    """(path, version) of the pinned chunks table."""
    if not inputs.chunks_path:
        raise ValueError("the baselines read bertxml.chunks: no chunks table in these inputs")
    return inputs.chunks_path, inputs.chunks_version


def load_first_chunks(inputs, split: str, max_notes: int = 0, seed: int = 0):
    """Chunk 0 of every note of `split` (at most `max_notes` notes, a seeded uniform sample, when > 0) from
    the pinned chunks table, as a ChunkSet (one chunk a note) and the number of notes in the split."""
    path, version = _chunk_table(inputs)
    wanted = {"max_len": int(inputs.max_len), "split": split, "chunk_index": 0}
    ids = read_delta(path, version, columns=["note_id"], filter=wanted)["note_id"]
    ids = pc.take(ids, pc.sort_indices(ids))  # the engine's row order varies; the seeded sample must not
    total = len(ids)
    columns = ["note_id", "chunk_index", "input_ids", "label_ids"]
    if max_notes and total > max_notes:
        keep = np.sort(np.random.default_rng(seed).choice(total, size=max_notes, replace=False))
        sample = pc.take(ids, keep).to_pylist()
        table = read_delta(path, version, columns=columns, filter={**wanted, "note_id": sample})
        log.info("%s: a sample of %d of %d notes (baseline.logreg_max_train_notes, seed %d)",
                 split, max_notes, total, seed)
    else:
        table = read_delta(path, version, columns=columns, filter=wanted)
    if table.num_rows == 0 and split == "train":
        raise ValueError(f"{path} (version {version}) has no train chunks with max_len {inputs.max_len}: "
                         f"run `bertxml tokenize --max-len {inputs.max_len}` first")
    return ChunkSet.from_arrow(table), total


def resolve_baseline_inputs(source, cfg: Config, model_kind: str, vocab_dir=None, out_dir=None):
    """`bertxml.training.inputs.resolve_train_inputs` for a baseline: the same pinned tables, label vocabulary and
    tokenizer, chunks of cfg.baseline.max_len, and a model folder named <kind>-<size>-<time>."""
    if model_kind not in KINDS:
        raise ValueError(f"unknown baseline {model_kind!r}; choose one of {KINDS}")
    workdir = source.workdir if hasattr(source, "spark") else Path(source)
    size = "bow" if model_kind == "logreg" else f"h{cfg.baseline.bilstm_hidden_size}-k{cfg.baseline.bilstm_heads}"
    if out_dir is None:
        version, out_dir = modeldir.new_model_dir(workdir, model_kind, size)
    else:
        version = modeldir.model_version(model_kind, size)
    pinned = config_from_dict(cfg.to_dict())
    pinned.model.max_len = int(cfg.baseline.max_len)
    # The pins do not depend on the head: resolve as for a [CLS] model, then name the kind.
    inputs = resolve_train_inputs(source, pinned, "cls", vocab_dir=vocab_dir, out_dir=out_dir)
    inputs.model_kind, inputs.model_version = model_kind, version
    return inputs


def _special_ids(tokenizer) -> list[int]:
    """Ids of [PAD], [CLS], [SEP], [MASK]: they carry no word. [UNK] does (an unknown word) and is kept."""
    ids = (tokenizer.token_to_id(tok) for tok in ("[PAD]", "[CLS]", "[SEP]", "[MASK]"))
    return sorted(i for i in ids if i is not None)


def train_logreg(inputs, cfg: Config) -> Path:
    """Fit the bag-of-words logistic regression on inputs' train split (or its sample), tune thresholds on
    dev, write the model folder. Returns it."""
    bc = cfg.baseline
    out_dir = Path(inputs.out_dir)
    tokenizer = Tokenizer.from_file(inputs.tokenizer_file)
    vocab_size, m = tokenizer.get_vocab_size(), len(inputs.labels)
    skip = _special_ids(tokenizer)
    train_set, n_train = load_first_chunks(inputs, "train", bc.logreg_max_train_notes, bc.seed)
    dev_set, _ = load_first_chunks(inputs, "dev")
    log.info("logreg: %d train notes (of %d), %d dev notes, %d labels, %d features, first %d tokens",
             train_set.n_notes, n_train, dev_set.n_notes, m, vocab_size, inputs.max_len)
    started = time.perf_counter()
    counts = bag_of_words(train_set.input_ids, vocab_size, skip)
    idf = idf_weights(counts) if bc.logreg_tfidf else None
    train_x, train_y = weight_features(counts, idf), train_set.note_labels(m)
    dev_x = weight_features(bag_of_words(dev_set.input_ids, vocab_size, skip), idf) if dev_set.n_notes else None
    grid = [float(c) for c in bc.logreg_c_grid] if dev_x is not None else []
    c, grid_aucs, best = bc.logreg_c, {}, None
    for value in grid:  # regularisation chosen on dev macro AUC (model selection never reads test)
        fit = fit_one_vs_rest(train_x, train_y, value, bc.logreg_max_iter, bc.seed)
        metrics = auc_metrics(logreg_probabilities(dev_x, *fit), dev_set.note_labels(m))
        grid_aucs[value] = metrics["macro_auc"]
        log.info("logreg: C=%g dev macro AUC %s", value, fmt_metric(metrics["macro_auc"]))
        if best is None or selection_score(metrics) > selection_score(best[0]):
            best, c = (metrics, fit), value
    if best is not None:
        log.info("logreg: C=%g chosen on dev", c)
    coef, intercept = best[1] if best is not None else fit_one_vs_rest(train_x, train_y, c, bc.logreg_max_iter,
                                                                        bc.seed)
    seconds = time.perf_counter() - started

    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {"coef": coef, "intercept": intercept}
    if idf is not None:
        tensors["idf"] = idf
    safetensors.numpy.save_file(tensors, str(out_dir / WEIGHTS_FILE))
    arch = {"model_kind": "logreg", "n_labels": m, "vocab_size": vocab_size, "max_len": inputs.max_len,
            "tfidf": bool(bc.logreg_tfidf), "skip_ids": skip, "c": c}
    modeldir.write_json(out_dir / CONFIG_FILE, arch)

    dev_probs = logreg_probabilities(dev_x, coef, intercept) if dev_x is not None else None
    extra = {"train_notes": train_set.n_notes, "train_notes_in_split": n_train, "c": c,
             "c_grid_dev_macro_auc": {str(value): auc for value, auc in grid_aucs.items()} or None,
             "train_sample_seed": bc.seed if train_set.n_notes < n_train else None,
             "nonzero_weights": int(np.count_nonzero(coef))}
    return _finish(out_dir, inputs, cfg, dev_probs, dev_set, coef.size + intercept.size, seconds, extra)


def _finish(out_dir: Path, inputs, cfg: Config, dev_probs, dev_set, parameters: int, seconds: float,
            extra: dict) -> Path:
    """Dev thresholds, operating points and metrics, then modeldir.write_model_dir (tokenizer, labels,
    thresholds, operating points, drift profile, manifest)."""

    codes = [row["code"] for row in inputs.labels]
    thresholds = np.full(len(codes), cfg.score.threshold_default, dtype=np.float32)
    dev_metrics: dict = {"notes": 0}
    points = None
    if dev_probs is not None:
        labels = dev_set.note_labels(len(codes))
        thresholds = tune_thresholds(dev_probs, labels, cfg.score.threshold_default)
        points = operating_points(dev_probs, labels, codes, thresholds, cfg.bands.auto_precision,
                                  cfg.bands.review_recall, cfg.bands.min_support)
        dev_metrics = {**auc_metrics(dev_probs, labels), "micro_f1": micro_f1(dev_probs, labels, thresholds)}
    dev_metrics.update(extra.pop("dev_extra", {}))
    saved = config_from_dict(cfg.to_dict())
    saved.model.max_len = inputs.max_len
    modeldir.write_model_dir(out_dir, model_version=inputs.model_version, model_kind=inputs.model_kind,
                             config=saved.to_dict(), inputs=inputs.versions, max_len=inputs.max_len,
                             dev_metrics=dev_metrics, parameters=parameters, train_seconds=seconds,
                             tokenizer_file=inputs.tokenizer_file, label_vocab=inputs.labels,
                             thresholds={c: float(th) for c, th in zip(codes, thresholds)},
                             operating_points=points,
                             extra={**extra, "tokenizer_sha256": inputs.extra.get("tokenizer_sha256"),
                                    "etl_run": inputs.extra.get("etl_run")},
                             drift_profile=add_dev_reference(inputs.drift_profile, codes, dev_probs, thresholds))
    log.info("%s %s: dev macro AUC %s, micro AUC %s -> %s", inputs.model_kind, inputs.model_version,
             fmt_metric(dev_metrics.get("macro_auc")), fmt_metric(dev_metrics.get("micro_auc")), out_dir)
    return out_dir


def train_bilstm(inputs, cfg: Config) -> Path:
    """StarSpace embeddings, then the BiGRU + multi-head attention on inputs' train split; the best dev
    macro AUC epoch is kept; thresholds tuned on dev; the model folder written. Returns it."""
    bc = cfg.baseline
    out_dir = Path(inputs.out_dir)
    device = pick_device()
    set_threads(bc.threads or cfg.train.threads, device)
    precision = decide_precision(device, cfg.train.bf16)
    tokenizer = Tokenizer.from_file(inputs.tokenizer_file)
    pad_id = tokenizer.token_to_id("[PAD]") or 0
    vocab_size, m = tokenizer.get_vocab_size(), len(inputs.labels)
    train_set, _ = load_first_chunks(inputs, "train")
    dev_set, _ = load_first_chunks(inputs, "dev")
    train_labels, dev_labels = train_set.note_labels(m), dev_set.note_labels(m)
    log.info("bilstm: %d train notes, %d dev notes, %d labels, first %d tokens; embeddings %d, GRU 2 x %d, "
             "%d heads; precision %s", train_set.n_notes, dev_set.n_notes, m, inputs.max_len, bc.embed_dim,
             bc.bilstm_hidden_size, bc.bilstm_heads, precision)
    started = time.perf_counter()

    embeddings = train_starspace(train_set.input_ids, train_set.label_ids, vocab_size, m, bc.embed_dim,
                                 bc.starspace_epochs, bc.starspace_lr, bc.starspace_batch_size, bc.seed,
                                 _special_ids(tokenizer))
    torch.manual_seed(bc.seed)
    model = BiGruAttention(vocab_size, bc.embed_dim, bc.bilstm_hidden_size, bc.bilstm_heads, m,
                           bc.bilstm_dropout, pad_id)
    with torch.no_grad():
        model.embed.weight.copy_(embeddings)
        model.embed.weight[pad_id].zero_()
        prior = (train_labels.sum(axis=0) + 0.5) / (train_set.n_notes + 1.0)
        model.out.bias.copy_(torch.from_numpy(np.log(prior / (1 - prior))).float())
    model.to(device)
    optimizer = make_optimizer(model, bc.bilstm_lr, bc.bilstm_weight_decay)
    lengths = train_set.lengths
    steps_per_epoch = math.ceil(len(lengths) / bc.bilstm_batch_size)
    total_steps = planned_steps(bc.bilstm_epochs, 0, steps_per_epoch)
    best, best_state, history, step = None, None, [], 0

    def evaluate(at_step: int) -> None:
        nonlocal best, best_state
        if not dev_set.n_notes:
            return
        probs = bilstm_probabilities(model, dev_set.input_ids, cfg.train.eval_batch_size, device, precision)
        metrics = {**auc_metrics(probs, dev_labels), "step": at_step, "epoch": round(at_step / steps_per_epoch, 3)}
        history.append(metrics)
        if selection_score(metrics) > selection_score(best):
            best, best_state = metrics, {k: v.detach().clone() for k, v in model.state_dict().items()}
        log.info("bilstm dev at step %d: macro AUC %s, micro AUC %s", at_step, fmt_metric(metrics["macro_auc"]),
                 fmt_metric(metrics["micro_auc"]))

    epoch, window = 0, []
    while step < total_steps:
        for index in bucketed_batches(lengths, bc.bilstm_batch_size, bc.seed, epoch):
            if step >= total_steps:
                break
            batch = {k: v.to(device) for k, v in coding_batch(train_set, index, m, pad_id).items()}
            model.train()
            with autocast(device, precision):
                loss = model(**batch)["loss"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if bc.bilstm_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), bc.bilstm_clip)
            optimizer.step()
            step += 1
            window.append(float(loss.detach()))
            if step % cfg.train.log_every == 0:
                log.info("bilstm step %d/%d loss %.4f", step, total_steps, sum(window) / len(window))
                window = []
            if step % steps_per_epoch == 0 or step == total_steps:
                evaluate(step)
        epoch += 1
    if best_state is not None:
        model.load_state_dict(best_state)
    seconds = time.perf_counter() - started

    save_bilstm(model, out_dir, inputs.max_len)
    dev_probs = bilstm_probabilities(model, dev_set.input_ids, cfg.train.eval_batch_size, device, precision) \
        if dev_set.n_notes else None
    parameters = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    extra = {"steps": total_steps, "trainable_parameters": trainable, "train_notes": train_set.n_notes,
             "precision": precision.to_dict(), "dev_extra": {"best_step": (best or {}).get("step"), "history": history}}
    return _finish(out_dir, inputs, cfg, dev_probs, dev_set, parameters, seconds, extra)


def train_baseline(inputs, cfg: Config) -> Path:
    """Train inputs.model_kind ("logreg" | "bilstm") from resolved inputs; returns the model folder."""
    if inputs.model_kind == "logreg":
        return train_logreg(inputs, cfg)
    if inputs.model_kind == "bilstm":
        return train_bilstm(inputs, cfg)
    raise ValueError(f"unknown baseline {inputs.model_kind!r}; choose one of {KINDS}")


def run_train_baseline(wh, cfg: Config, model_kind: str, out_dir: str | Path | None = None,
                       vocab_dir: str | Path | None = None) -> Path:
    """`bertxml train --model logreg|bilstm`: one baseline from the warehouse's tables as they stand (pinned),
    recorded in job_runs. Returns the model folder (default WORKDIR/models/<model_version>)."""
    with job_run(wh, "train") as run:
        inputs = resolve_baseline_inputs(wh, cfg, model_kind, vocab_dir, out_dir)
        run.inputs.update(inputs.versions)
        model_dir = train_baseline(inputs, cfg)
        manifest = modeldir.load_manifest(model_dir)
        run.outputs["model_dir"] = str(model_dir)
        run.count("model_kind", model_kind)
        run.count("dev_macro_auc", manifest["dev_metrics"].get("macro_auc"))
        run.count("train_seconds", manifest["train_seconds"])
        log_job_model(run, wh, cfg, model_dir, "train")  # MLflow run + registered version (bertxml.models.registry)
    return Path(model_dir)
