"""Chunking notes into `[CLS] ... [SEP]` pieces, in plain Python and as the Spark job writing bertxml.chunks."""
import datetime as dt
import json

import pytest
from tokenizers import Tokenizer

from bertxml.platform import tables as t
from bertxml.config import VocabConfig
from bertxml.text.tokenize import chunk_note, encode_chunks, run_tokenize
from bertxml.text.vocab import PLACEHOLDERS, SPECIAL, SPECIAL_TOKENS, new_tokenizer, save_vocab

WORDS = ["a", "b", "c", "d", "e", "f", "patient", "pain", "mg", "n", "nn"]
CLS, SEP = SPECIAL["cls"], SPECIAL["sep"]


@pytest.fixture(scope="module")
def tok():
    """Every word of WORDS is one token, so a text of k words is k tokens."""
    vocab = {w: i for i, w in enumerate(SPECIAL_TOKENS + PLACEHOLDERS + WORDS)}
    return new_tokenizer(vocab, VocabConfig())


def test_chunks_are_bounded_wrapped_and_lossless(tok):
    texts = ["a " * 12, "b " * 6, "c " * 7, "", "patient pain 10 mg\n" * 40]
    chunks = encode_chunks(tok, texts, 8)
    assert [[len(c) for c in note] for note in chunks[:4]] == [[8, 8], [8], [8, 3], [2]]
    assert chunks[3] == [[CLS, SEP]]
    for text, note in zip(texts, chunks):
        assert all(len(c) <= 8 and c[0] == CLS and c[-1] == SEP for c in note)
        body = [i for c in note for i in c[1:-1]]
        assert body == tok.encode(text, add_special_tokens=False).ids
    assert len(chunks[4]) == -(-160 // 6)
    with pytest.raises(ValueError, match="max_len"):
        encode_chunks(tok, ["a"], 2)


def test_a_truncating_tokenizer_still_gives_the_whole_note(tok):
    truncating = Tokenizer.from_str(tok.to_str())
    truncating.enable_truncation(4)
    assert encode_chunks(truncating, ["a " * 12], 8) == encode_chunks(tok, ["a " * 12], 8)
    assert truncating.truncation is not None                   # the caller's tokenizer is left as it was


def test_sentence_starts_are_line_openings_in_chunk_positions(tok):
    ids = {w: tok.token_to_id(w) for w in WORDS}
    assert chunk_note(tok, "a b\nc d e\n\nf", 5) == [
        ([CLS, ids["a"], ids["b"], ids["c"], SEP], [1, 3]),
        ([CLS, ids["d"], ids["e"], ids["f"], SEP], [3]),
    ]
    assert chunk_note(tok, "", 5) == [([CLS, SEP], [])]
    assert chunk_note(tok, "  a\n[**Known lastname 1**] b", 8)[0][1] == [1, 2]


def labeled(note_id, split, text, codes):
    return (note_id, f"P{note_id}", f"E{note_id}", dt.date(2024, 1, 1), split, text, codes, [])


def test_run_tokenize(spark, wh, cfg, tok, tmp_path):
    notes = [labeled("n1", "train", "patient pain\nmg 5", ["A01", "B02"]),
             labeled("n2", "dev", "a b c", ["C03"]),
             labeled("n3", "test", "a b c d e f\n" * 4, ["B02", "D04", "C03"])]
    vocab = [(0, "A01", "a", 3, False), (1, "B02", "b", 5, True), (2, "D04", "d", 4, False)]
    wh.write(spark.createDataFrame(notes, t.LABELED_NOTES_SCHEMA), wh.name(t.LABELED_NOTES))
    wh.write(spark.createDataFrame(vocab, t.LABEL_VOCAB_SCHEMA), wh.name(t.LABEL_VOCAB))
    save_vocab(tok, VocabConfig(), tmp_path / "vocab")

    stats = run_tokenize(wh, cfg, tmp_path / "vocab", max_len=16)
    assert {k: stats[k] for k in ("notes", "chunks", "notes_over_max_len", "max_len")} == \
        {"notes": 3, "chunks": 4, "notes_over_max_len": 1, "max_len": 16}
    rows = {(r.note_id, r.chunk_index): r for r in wh.table(wh.name(t.CHUNKS)).collect()}
    assert sorted(rows) == [("n1", 0), ("n2", 0), ("n3", 0), ("n3", 1)]
    assert rows["n1", 0].label_ids == [0, 1] and rows["n2", 0].label_ids == [] and rows["n3", 1].label_ids == [1, 2]
    assert rows["n1", 0].split == "train" and rows["n1", 0].max_len == 16
    assert rows["n1", 0].input_ids == encode_chunks(tok, ["patient pain\nmg 5"], 16)[0][0]
    assert rows["n1", 0].sentence_starts == [1, 3]
    assert rows["n3", 0].sentence_starts == [1, 7, 13] and rows["n3", 1].sentence_starts == [5]

    meta = json.loads(wh.spark.sql(f"DESCRIBE HISTORY delta.`{wh.path(wh.name(t.CHUNKS))}`")
                      .orderBy("version", ascending=False).first().userMetadata)
    assert meta["labeled_notes_version"] == 0 and meta["label_vocab_version"] == 0
    assert meta["tokenizer_sha256"] == stats["tokenizer_sha256"] and len(meta["tokenizer_sha256"]) == 64

    # Another max_len's chunks sit beside them; a rerun replaces only its own max_len, never duplicates.
    other = [("n1", "train", 32, 0, [CLS, SEP], [], [])]
    wh.write(spark.createDataFrame(other, t.CHUNKS_SCHEMA), wh.name(t.CHUNKS), mode="append")
    assert run_tokenize(wh, cfg, tmp_path / "vocab", max_len=16)["chunks"] == 4
    counts = {r.max_len: r["count"] for r in wh.table(wh.name(t.CHUNKS)).groupBy("max_len").count().collect()}
    assert counts == {16: 4, 32: 1}
    with pytest.raises(ValueError, match="max_position_embeddings"):
        run_tokenize(wh, cfg, tmp_path / "vocab", max_len=2048)
