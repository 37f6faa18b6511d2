"""Notes to token chunks (paper §4.1: "Notes are padded to or split to chunks of a maximum length of 512 or
1,024"), as a Spark job writing `bertxml.chunks`.

    bertxml tokenize [--vocab DIR] [--max-len 512|1024]

Each labeled note becomes one or more chunks `[CLS] piece [SEP]` of at most max_len ids, cut in order with
no overlap (the note-level prediction is the max over its chunks). A chunk row carries the note's labels
(`label_ids`: label_vocab.label_index of its codes that are in the label vocabulary) and `sentence_starts`:
positions in input_ids where a line of the note begins (the notes hold one sentence a line), for the
next-sentence pairs of pre-training.

The table holds one chunking per max_len; a rerun replaces only its own max_len (`replaceWhere`), in one
Delta transaction whose userMetadata records the labeled_notes and label_vocab versions read and the
sha256 of tokenizer.json. The tokenizer is loaded once per Python worker, from a broadcast of its JSON.
`encode_chunks` is the same chunking in plain Python, for scoring.
"""
from __future__ import annotations

import functools
import hashlib
import itertools
import json
import logging
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
from pyspark.sql import functions as F
from tokenizers import Tokenizer

from bertxml.platform import tables as t
from bertxml.platform.runs import job_run

log = logging.getLogger("bertxml.text.tokenize")

MIN_MAX_LEN = 3  # [CLS] one piece [SEP]


def _special_ids(tokenizer: Tokenizer) -> tuple[int, int]:
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    if cls_id is None or sep_id is None:
        raise ValueError("the tokenizer has no [CLS] or [SEP] token")
    return cls_id, sep_id


def _untruncated(tokenizer: Tokenizer) -> Tokenizer:
    """The tokenizer itself, or a copy without truncation and padding (an off-the-shelf tokenizer.json may
    truncate at 128 or 512 tokens, which would silently drop the rest of a note)."""
    if tokenizer.truncation is None and tokenizer.padding is None:
        return tokenizer
    copy = Tokenizer.from_str(tokenizer.to_str())
    copy.no_truncation()
    copy.no_padding()
    return copy


def _check_max_len(max_len: int) -> int:
    if int(max_len) < MIN_MAX_LEN:
        raise ValueError(f"max_len must be at least {MIN_MAX_LEN}, got {max_len}")
    return int(max_len)


def _cuts(n_tokens: int, max_len: int) -> range:
    """Start offsets of each chunk's body; an empty note still gets one (empty) chunk."""
    return range(0, max(n_tokens, 1), max_len - 2)


def encode_chunks(tokenizer: Tokenizer, texts: list[str], max_len: int, return_encodings: bool = False):
    """Per text, its chunks of token ids: `[CLS] piece [SEP]`, each at most max_len ids.

    The pieces, concatenated, are the text's full encoding without special tokens; an empty text gives one
    chunk `[CLS] [SEP]`. With return_encodings, returns (chunks, encodings): each text's
    `tokenizers.Encoding`, whose `offsets[i]` are the (start, end) characters of the note's token i; the
    token at position p (1 .. len - 2) of chunk c is note token `chunk_token(c, p, max_len)`.
    """
    max_len = _check_max_len(max_len)
    cls_id, sep_id = _special_ids(tokenizer)
    tokenizer = _untruncated(tokenizer)
    body = max_len - 2
    out = []
    encodings = tokenizer.encode_batch([text or "" for text in texts], add_special_tokens=False)
    for enc in encodings:
        ids = enc.ids
        out.append([[cls_id, *ids[start:start + body], sep_id] for start in _cuts(len(ids), max_len)])
    return (out, encodings) if return_encodings else out


def chunk_token(chunk_index: int, position, max_len: int):
    """The note token index of `position` (1 .. len - 2; an int or a numpy array) in chunk `chunk_index`:
    chunks cut the note's encoding in order, max_len - 2 tokens each, after a [CLS]."""
    return chunk_index * (max_len - 2) + position - 1


def line_openers(text: str, encoding) -> np.ndarray:
    """Indices of the tokens of `encoding` (the encoding of text) that open a line of the text: the first
    token, and each token on a later line than the token before it. A token's line is that of its first
    character; a placeholder's offsets may point inside the replaced span, which is on the same line."""
    n = len(encoding.ids)
    if not n:
        return np.zeros(0, dtype=np.int64)
    begins = np.fromiter(itertools.chain.from_iterable(encoding.offsets), dtype=np.int64, count=2 * n)[::2]
    # One code unit a character, as the tokenizer's offsets count them (surrogatepass: a lone surrogate too).
    chars = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    lines = np.searchsorted(np.flatnonzero(chars == 10), begins, side="left")   # newlines before each token
    return np.flatnonzero(np.diff(lines, prepend=-1))


def chunk_note(tokenizer: Tokenizer, text: str, max_len: int) -> list[tuple[list[int], list[int]]]:
    """One note's chunks as (input_ids, sentence_starts); sentence_starts are positions in input_ids
    (the [CLS] is position 0) of tokens that open a line of the note."""
    return chunk_notes(tokenizer, [text], max_len)[0]


def chunk_notes(tokenizer: Tokenizer, texts: list[str], max_len: int) -> list[list[tuple[list[int], list[int]]]]:
    """`encode_chunks` plus each chunk's sentence starts, for a batch of notes."""
    max_len = _check_max_len(max_len)
    cls_id, sep_id = _special_ids(tokenizer)
    tokenizer = _untruncated(tokenizer)
    body = max_len - 2
    texts = [text or "" for text in texts]
    out = []
    for text, enc in zip(texts, tokenizer.encode_batch(texts, add_special_tokens=False)):
        opens, note_ids = line_openers(text, enc), enc.ids
        chunks = []
        for start in _cuts(len(note_ids), max_len):
            stop = start + body
            ids = [cls_id, *note_ids[start:stop], sep_id]
            first, last = np.searchsorted(opens, [start, stop], side="left")
            chunks.append((ids, (opens[first:last] + 1 - start).tolist()))
        out.append(chunks)
    return out


# ---- the Spark job ----------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=2)
def _worker_tokenizer(digest: str, tokenizer_json: str) -> Tokenizer:
    # Keyed by the digest: a Python worker is reused across tasks, so each loads the tokenizer once.
    return Tokenizer.from_str(tokenizer_json)


def chunk_frames(frames: Iterator, tokenizer_json: str, code_index: dict[str, int], max_len: int) -> Iterator:
    """mapInPandas body: frames of (note_id, split, text, codes) -> frames of CHUNKS_SCHEMA rows."""
    digest = hashlib.sha256(tokenizer_json.encode("utf-8")).hexdigest()
    tokenizer = _worker_tokenizer(digest, tokenizer_json)
    columns = [f.name for f in t.CHUNKS_SCHEMA.fields]
    for frame in frames:
        rows = []
        notes = chunk_notes(tokenizer, frame["text"].fillna("").tolist(), max_len)
        for note_id, split, codes, chunks in zip(frame["note_id"], frame["split"], frame["codes"], notes):
            labels = sorted({code_index[c] for c in (codes if codes is not None else []) if c in code_index})
            for index, (ids, sentence_starts) in enumerate(chunks):
                rows.append((note_id, split, max_len, index, ids, labels, sentence_starts))
        yield pd.DataFrame.from_records(rows, columns=columns)


def chunk_notes_df(notes, tokenizer_json: str, code_index: dict[str, int], max_len: int):
    """DataFrame of labeled notes -> DataFrame of chunks (CHUNKS_SCHEMA); broadcasts the tokenizer and
    the code map so each worker receives them once."""
    max_len = _check_max_len(max_len)
    sc = notes.sparkSession.sparkContext
    tok_bc, codes_bc = sc.broadcast(tokenizer_json), sc.broadcast(code_index)

    def chunk(frames):
        yield from chunk_frames(frames, tok_bc.value, codes_bc.value, max_len)

    return notes.select("note_id", "split", "text", "codes").mapInPandas(chunk, schema=t.CHUNKS_SCHEMA)


def chunk_stats(chunks) -> dict:
    """Counts over a chunks DataFrame of one max_len: notes, chunks, chunks per note, notes over max_len.

    One pass, grouped by split only: a note has exactly one chunk 0, and a chunk 1 when it is over max_len.
    """
    rows = chunks.groupBy("split").agg(
        F.sum(F.when(F.col("chunk_index") == 0, 1).otherwise(0)).alias("notes"),
        F.count("*").alias("chunks"),
        F.sum(F.when(F.col("chunk_index") == 1, 1).otherwise(0)).alias("over"),
        F.max("chunk_index").alias("last")).collect()
    notes, n_chunks = sum(r["notes"] for r in rows), sum(r["chunks"] for r in rows)
    return {"notes": notes, "chunks": n_chunks,
            "chunks_per_note": round(n_chunks / notes, 4) if notes else 0.0,
            "notes_over_max_len": sum(r["over"] for r in rows),
            "most_chunks_in_a_note": max((r["last"] + 1 for r in rows), default=0),
            "notes_by_split": {r["split"]: r["notes"] for r in rows}}


def run_tokenize(wh, cfg, vocab_dir: str | Path | None = None, max_len: int | None = None) -> dict:
    """Chunk every labeled note with the vocabulary in vocab_dir; write bertxml.chunks for this max_len.

    Returns the counts of `chunk_stats` plus {"max_len", "version", "tokenizer_sha256"}.
    """

    vocab_dir = Path(vocab_dir) if vocab_dir else wh.workdir / "vocab"
    max_len = _check_max_len(max_len if max_len is not None else cfg.model.max_len)
    if max_len > cfg.model.max_position_embeddings:
        raise ValueError(f"max_len {max_len} exceeds model.max_position_embeddings "
                         f"{cfg.model.max_position_embeddings}")
    tok_path = vocab_dir / "tokenizer.json"
    if not tok_path.exists():
        raise FileNotFoundError(f"no tokenizer.json in {vocab_dir}: run `bertxml vocab` first")
    tokenizer_json = tok_path.read_text(encoding="utf-8")
    sha = hashlib.sha256(tok_path.read_bytes()).hexdigest()
    Tokenizer.from_str(tokenizer_json)  # fail here, not in a worker, on a broken file
    notes_name, vocab_name, chunks_name = wh.name(t.LABELED_NOTES), wh.name(t.LABEL_VOCAB), wh.name(t.CHUNKS)

    with job_run(wh, "tokenize") as run:
        versions = {}
        for name in (notes_name, vocab_name):
            versions[name] = wh.version(name)
            if versions[name] is None:
                raise FileNotFoundError(f"table {name} does not exist: run `bertxml etl` first")
            run.inputs[name] = versions[name]
        run.inputs[str(vocab_dir)] = sha[:12]
        code_index = {r["code"]: int(r["label_index"])
                      for r in wh.table(vocab_name, version=versions[vocab_name])
                      .select("code", "label_index").collect()}
        notes = wh.table(notes_name, version=versions[notes_name])
        chunks = chunk_notes_df(notes, tokenizer_json, code_index, max_len)
        metadata = json.dumps({"job": "tokenize", "run_id": run.run_id, "max_len": max_len,
                               "labeled_notes_version": versions[notes_name],
                               "label_vocab_version": versions[vocab_name],
                               "tokenizer_sha256": sha, "vocab_dir": str(vocab_dir)})
        if wh.exists(chunks_name):
            version = wh.write(chunks, chunks_name, replace_where=f"max_len = {max_len}", metadata=metadata)
        else:
            version = wh.write(chunks, chunks_name, metadata=metadata)
        run.outputs[chunks_name] = version

        stats = chunk_stats(wh.table(chunks_name, version=version).filter(F.col("max_len") == max_len))
        for key, value in stats.items():
            run.count(key, value)
        run.count("label_codes", len(code_index))
    return {**stats, "max_len": max_len, "version": version, "tokenizer_sha256": sha}


# ---- notes to chunks for scoring (the training chunking, capped) ------------------------------------------
CHARS_PER_TOKEN_CAP = 64   # text cut at max_chunks * max_len * this many characters before tokenising


def encode_notes(tokenizer, texts: list, max_len: int, max_chunks: int, return_encodings: bool = False):
    """Note texts -> (each note's first `max_chunks` chunks, word pieces per note (of the text read),
    truncated (n,): the note had more chunks, or more than max_chunks * max_len * CHARS_PER_TOKEN_CAP
    characters, which are all that is tokenised). The training chunking: [CLS] piece [SEP], in order, no
    overlap (`encode_chunks`). Shared by the BERT scorer and the baselines'.
    return_encodings adds a 4th item: each note's `tokenizers.Encoding` (token -> character offsets)."""
    char_cap = max_chunks * max_len * CHARS_PER_TOKEN_CAP
    cleaned = [clean_text(x) for x in texts]
    notes, encodings = encode_chunks(tokenizer, [x[:char_cap] for x in cleaned], max_len, return_encodings=True)
    n_tokens = np.array([sum(len(c) - 2 for c in chunks) for chunks in notes], dtype=np.int64)
    truncated = np.array([len(c) > max_chunks or len(x) > char_cap for c, x in zip(notes, cleaned)], dtype=bool)
    chunks = [c[:max_chunks] for c in notes]
    return (chunks, n_tokens, truncated, encodings) if return_encodings else (chunks, n_tokens, truncated)


def clean_text(text) -> str:
    """None -> ''; lone surrogates (not encodable as UTF-8, which the Rust tokenizer refuses) -> U+FFFD."""
    if text is None:
        return ""
    text = str(text)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "replace").decode("utf-8")
    return text
