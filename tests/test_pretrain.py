"""Tests for bertxml/training/pretrain.py, its batches included: next-sentence pairs from the notes' own
sentence order, MLM batches, and pre-training end to end (loss falls; the encoder folder is
fine-tuned by run_train).

Run: .venv/bin/python -m pytest -q tests/test_pretrain.py
"""
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import safetensors.torch
import torch

from bertxml.models import modeldir
from bertxml.platform import tables as t
from bertxml.text.data import ChunkSet
from bertxml.training.pretrain import IS_NEXT, NOT_NEXT
from bertxml.training.pretrain import nsp_example, pretraining_batch, split_sentences
from bertxml.models.pretraining import IGNORE_INDEX
from test_train import assert_no_pickles, make_notes, make_vocab_dir, tiny_config, write_tables

SPECIAL = {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}
CLS, SEP = SPECIAL["cls"], SPECIAL["sep"]
# note "a": sentences [10 11] [12 13 14] [15]; note "b": [20 21] [22 23]; note "c": one sentence
THREE_NOTES = ChunkSet.from_notes(
    ["a", "b", "c"],
    [[([CLS, 10, 11, 12, 13, 14, 15, SEP], [1, 3, 6])], [([CLS, 20, 21, 22, 23, SEP], [1, 3])],
     [([CLS, 30, 31, 32, 33, SEP], [1])]],
    [[], [], []])


def segments(ids: np.ndarray) -> tuple[list, list]:
    first, second = [i for i, x in enumerate(ids) if x == SEP][:2]
    return ids[1:first].tolist(), ids[first + 1:second].tolist()


def test_split_sentences_cuts_the_body_at_sentence_starts():
    sentences = split_sentences(THREE_NOTES.input_ids[0], THREE_NOTES.sentence_starts[0])
    assert [s.tolist() for s in sentences] == [[10, 11], [12, 13, 14], [15]]
    # a chunk that starts mid-sentence (no start at 1) still begins with a piece of its own
    assert [s.tolist() for s in split_sentences(np.array([CLS, 7, 8, 9, SEP]), np.array([3]))] == [[7, 8], [9]]


def test_nsp_pairs_follow_the_notes_sentence_order():
    rng = np.random.default_rng(0)
    labels = []
    for _ in range(300):
        ids, types, label = nsp_example(THREE_NOTES, 0, rng, max_len=32, cls_id=CLS, sep_id=SEP)
        seg_a, seg_b = segments(ids)
        assert ids[0] == CLS and ids[-1] == SEP and len(ids) == len(seg_a) + len(seg_b) + 3
        assert types.tolist() == [0] * (len(seg_a) + 2) + [1] * (len(seg_b) + 1)
        assert seg_a in ([10, 11], [10, 11, 12, 13, 14])  # A: the first k sentences, k >= 1
        true_b = [10, 11, 12, 13, 14, 15][len(seg_a):]
        if label == IS_NEXT:
            assert seg_b == true_b  # B: the sentences that follow
        else:
            # B: from a sentence start of ANOTHER note, no longer than the true continuation
            assert any(seg_b == s[:len(seg_b)] for s in ([20, 21, 22, 23], [22, 23], [30, 31, 32, 33]))
            assert 1 <= len(seg_b) <= len(true_b)
        labels.append(label)
    assert 100 < labels.count(NOT_NEXT) < 200


def test_nsp_single_sentence_chunk_is_cut_at_a_token_and_pairs_fit_max_len():
    rng = np.random.default_rng(1)
    for _ in range(50):
        ids, _, label = nsp_example(THREE_NOTES, 2, rng, max_len=32, cls_id=CLS, sep_id=SEP)
        seg_a, seg_b = segments(ids)
        if label == IS_NEXT:
            assert seg_a + seg_b == [30, 31, 32, 33] and seg_a and seg_b
    for _ in range(50):
        ids, _, _ = nsp_example(THREE_NOTES, 0, rng, max_len=6, cls_id=CLS, sep_id=SEP)
        assert len(ids) <= 6


def test_pretraining_batch_masks_real_tokens_only_and_is_reproducible():
    index = np.array([0, 1, 2])
    kwargs = dict(nsp=True, seed=5, max_len=32, special=SPECIAL, vocab_size=40, mlm_probability=0.5)
    batch = pretraining_batch(THREE_NOTES, index, step=3, **kwargs)
    again = pretraining_batch(THREE_NOTES, index, step=3, **kwargs)
    other = pretraining_batch(THREE_NOTES, index, step=4, **kwargs)
    assert all(torch.equal(batch[k], again[k]) for k in batch)  # rebuilt identically after a resume
    assert not all(torch.equal(batch[k], other[k]) for k in batch if batch[k].shape == other[k].shape)
    labels, mask = batch["mlm_labels"], batch["attention_mask"]
    assert batch["input_ids"].shape == labels.shape == batch["token_type_ids"].shape == mask.shape
    assert batch["nsp_labels"].shape == (3,)
    unmasked = pretraining_batch(THREE_NOTES, index, step=3, **{**kwargs, "mlm_probability": 0.0})
    originals = unmasked["input_ids"]
    special_or_pad = (mask == 0) | (originals == CLS) | (originals == SEP)
    assert (labels[special_or_pad] == IGNORE_INDEX).all()          # never predict [CLS]/[SEP]/[PAD]
    chosen = labels != IGNORE_INDEX
    assert chosen.any() and torch.equal(labels[chosen], originals[chosen])
    assert (batch["token_type_ids"][mask == 0] == 0).all()
    plain = pretraining_batch(THREE_NOTES, index, step=3, **{**kwargs, "nsp": False})
    assert plain["nsp_labels"] is None and (plain["token_type_ids"] == 0).all()


def test_run_pretrain_loss_falls_and_the_encoder_fine_tunes(wh, tmp_path):
    from bertxml.training.pretrain import run_pretrain
    from bertxml.training.train import run_train

    vocab_dir = make_vocab_dir(wh.workdir / "vocab")
    notes = make_notes(n_train=48, n_dev=16, seed=3)
    write_tables(wh, vocab_dir, notes)
    corpus = tmp_path / "corpus.parquet"
    pq.write_table(pa.table({"note_id": ["c1", "c2"], "text": [n["text"] for n in notes[:2]]}), corpus)

    cfg = tiny_config(max_steps=3, lr=1e-5, eval_batch_size=32)
    for key, value in dict(max_len=24, batch_size=8, epochs=8, lr=2e-3, warmup=0.1, log_every=5, bf16="false",
                           threads=1, dev_batches=4, seed=3).items():
        setattr(cfg.pretrain, key, value)
    cfg.model.attention_probs_dropout_prob = 0.1  # fine-tuning's; pre-training runs pretrain.attention_dropout (0)
    encoder = run_pretrain(wh, cfg, vocab_dir, None, corpus_sources=[f"parquet:{corpus}"])

    assert encoder.parent == wh.workdir / "models" and encoder.name.startswith("encoder-h32-l2-")
    assert sorted(p.name for p in encoder.iterdir()) == ["config.json", "manifest.json", "model.safetensors",
                                                         "tokenizer.json"]
    assert_no_pickles(encoder)
    manifest = modeldir.load_manifest(encoder)
    assert set(modeldir.MANIFEST_KEYS) <= set(manifest) and manifest["model_kind"] == "encoder"
    assert manifest["inputs"] == {wh.name(t.CHUNKS): wh.version(wh.name(t.CHUNKS)), f"parquet:{corpus}": None}
    dev = manifest["dev_metrics"]
    assert dev["loss"] < dev["initial"]["loss"] and dev["mlm_loss"] < dev["initial"]["mlm_loss"], dev
    assert {"mlm_loss", "nsp_loss"} <= set(dev)
    history = manifest["loss_history"]
    assert history[-1]["loss"] < history[0]["loss"], history
    assert modeldir.find_latest_model(wh.workdir, kinds=("encoder",)) == encoder

    model_dir = run_train(wh, cfg, encoder_dir=encoder, out_dir=tmp_path / "fine-tuned")
    tuned = modeldir.load_manifest(model_dir)
    assert tuned["encoder_dir"] == str(encoder) and tuned["config"]["model"]["hidden_size"] == 32
    pretrained = safetensors.torch.load_file(str(encoder / "model.safetensors"))
    fine = safetensors.torch.load_file(str(model_dir / "model.safetensors"))
    name = "bert.embeddings.word_embeddings.weight"
    assert torch.allclose(fine[name], pretrained[name], atol=1e-3)   # 3 steps at lr 1e-5 from the encoder
    assert json.loads((encoder / "config.json").read_text())["vocab_size"] == fine[name].shape[0]
    # pre-trained without attention dropout (pretrain.attention_dropout: SDPA's fused kernel); the
    # fine-tuned model has the model's own rate again
    assert json.loads((encoder / "config.json").read_text())["attention_probs_dropout_prob"] == 0.0
    assert json.loads((model_dir / "model_config.json").read_text())["bert_config"][
        "attention_probs_dropout_prob"] == 0.1
