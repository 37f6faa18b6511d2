"""Chunk rows to training batches: reading `bertxml.chunks` without a JVM, length-bucketed batches, padding,
and the next-sentence pairs of pre-training (paper §3.2).

Everything here is plain Python/NumPy/PyTorch, so a training worker started by torchrun or Spark's
TorchDistributor needs no SparkSession: Delta files are read with `bertxml.platform.deltaread` at a version pinned
by the driver.

Shapes: B chunks in a batch, T tokens (the longest chunk of the batch), M labels.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from bertxml.platform.deltaread import read_delta

CHUNK_COLUMNS = ("note_id", "split", "max_len", "chunk_index", "input_ids", "label_ids", "sentence_starts")


def load_chunks(table_path: str | Path, version: int | None, split: str | None, max_len: int,
                columns: tuple[str, ...] = CHUNK_COLUMNS) -> pa.Table:
    """Chunk rows of one split (None: all) and one chunking (max_len) from the chunks table's Delta files
    as of `version`. Returns a pyarrow Table; raises ValueError when there is no train chunk of that max_len
    (an empty dev or test split is returned as an empty table)."""
    wanted = {"max_len": int(max_len)} | ({"split": split} if split is not None else {})
    table = read_delta(str(table_path), version, columns=list(columns), filter=wanted)
    if table.num_rows == 0 and split in (None, "train"):
        raise ValueError(f"{table_path} (version {version}) has no {split or ''} chunks with max_len {max_len}: "
                         f"run `bertxml tokenize --max-len {max_len}` first")
    return table


def _list_column(table: pa.Table, name: str) -> list[np.ndarray]:
    """A list<int> column as one int64 array per row, without going through Python lists."""
    col = table[name].combine_chunks()
    values = col.values.to_numpy(zero_copy_only=False).astype(np.int64)
    offsets = col.offsets.to_numpy()
    return [values[offsets[i]:offsets[i + 1]] for i in range(len(col))]


@dataclass
class ChunkSet:
    """The chunks of a set of notes, in (note_id, chunk_index) order.

    note_ids: one per note; note_index (n_chunks,): each chunk's note, 0..n_notes-1; input_ids,
    label_ids, sentence_starts: one int64 array per chunk (a note's label_ids repeat on each chunk).
    """
    note_ids: list[str]
    note_index: np.ndarray
    input_ids: list[np.ndarray]
    label_ids: list[np.ndarray]
    sentence_starts: list[np.ndarray]

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def n_notes(self) -> int:
        return len(self.note_ids)

    @property
    def lengths(self) -> np.ndarray:
        return np.array([len(ids) for ids in self.input_ids], dtype=np.int64)

    @classmethod
    def from_arrow(cls, table: pa.Table) -> "ChunkSet":
        """From chunk rows (note_id, chunk_index, input_ids, label_ids[, sentence_starts])."""
        if table.num_rows:
            table = table.take(pc.sort_indices(table, [("note_id", "ascending"), ("chunk_index", "ascending")]))
        note_col = table["note_id"].to_pylist()
        note_ids, note_index = [], np.empty(len(note_col), dtype=np.int64)
        for i, note in enumerate(note_col):
            if not note_ids or note_ids[-1] != note:
                note_ids.append(note)
            note_index[i] = len(note_ids) - 1
        input_ids = _list_column(table, "input_ids")
        starts = (_list_column(table, "sentence_starts") if "sentence_starts" in table.column_names
                  else [np.array([1], dtype=np.int64) for _ in input_ids])
        return cls(note_ids, note_index, input_ids, _list_column(table, "label_ids"), starts)

    @classmethod
    def from_notes(cls, note_ids: list[str], chunks: list[list[tuple[list[int], list[int]]]],
                   label_ids: list[list[int]]) -> "ChunkSet":
        """From per-note chunks [(input_ids, sentence_starts), ...] (bertxml.text.tokenize.chunk_notes) and
        per-note label indices; notes are sorted by id like `from_arrow`."""
        order = sorted(range(len(note_ids)), key=lambda i: note_ids[i])
        ids, labels, starts, index = [], [], [], []
        for n, i in enumerate(order):
            for chunk_ids, chunk_starts in chunks[i]:
                ids.append(np.asarray(chunk_ids, dtype=np.int64))
                starts.append(np.asarray(chunk_starts, dtype=np.int64))
                labels.append(np.asarray(sorted(label_ids[i]), dtype=np.int64))
                index.append(n)
        return cls([note_ids[i] for i in order], np.asarray(index, dtype=np.int64), ids, labels, starts)

    @classmethod
    def concat(cls, sets: list["ChunkSet"]) -> "ChunkSet":
        """Several chunk sets as one (e.g. the notes plus an unlabelled corpus); note numbers are shifted."""
        note_ids, index, offset = [], [], 0
        for s in sets:
            note_ids += s.note_ids
            index.append(s.note_index + offset)
            offset += s.n_notes
        return cls(note_ids, np.concatenate(index) if index else np.zeros(0, dtype=np.int64),
                   [a for s in sets for a in s.input_ids], [a for s in sets for a in s.label_ids],
                   [a for s in sets for a in s.sentence_starts])

    def token_counts(self, vocab_size: int, block: int = 10_000) -> np.ndarray:
        """(V,) how often each token id occurs, counted a block of chunks at a time (no copy of the corpus)."""
        counts = np.zeros(vocab_size, dtype=np.int64)
        for start in range(0, len(self), block):
            ids = np.concatenate(self.input_ids[start:start + block])
            counts += np.bincount(ids, minlength=vocab_size)[:vocab_size]
        return counts

    def label_rates(self, n_labels: int) -> np.ndarray:
        """(M,) the share of chunks that carry each label (what a chunk-level head should predict a priori)."""
        counts = np.zeros(n_labels, dtype=np.float64)
        for labels in self.label_ids:
            counts[labels] += 1
        return counts / max(1, len(self))

    def note_labels(self, n_labels: int) -> np.ndarray:
        """(n_notes, M) 0/1 float32 matrix of each note's labels."""
        out = np.zeros((self.n_notes, n_labels), dtype=np.float32)
        for note, labels in zip(self.note_index, self.label_ids):
            out[note, labels] = 1.0
        return out


# ---------------------------------------------------------------------------------------------------------
# Batches


def bucketed_batches(lengths: np.ndarray, batch_size: int, seed: int, epoch: int,
                     window_batches: int = 50) -> list[np.ndarray]:
    """One epoch's training batches of chunk indices, the same for the same (seed, epoch).

    Shuffles all chunks, sorts them by length inside windows of `window_batches` batches, cuts batches
    and shuffles the batch order: batches hold chunks of similar length (little padding) while each epoch
    still sees a fresh random order. A resumed run rebuilds exactly the batches it was interrupted in.
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    window = max(1, batch_size * max(1, window_batches))
    batches = []
    for start in range(0, len(order), window):
        block = order[start:start + window]
        block = block[np.argsort(lengths[block], kind="stable")]
        batches.extend(block[i:i + batch_size] for i in range(0, len(block), batch_size))
    return [batches[i] for i in rng.permutation(len(batches))]


def eval_batches(lengths: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Batches for inference: every chunk once, sorted by length (least padding), fixed order."""
    order = np.argsort(lengths, kind="stable")
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def shard_batches(batches: list, rank: int, world_size: int) -> list:
    """This process's share of the batches under data parallelism: every world_size-th batch, after
    dropping the last few so that every rank takes the same number of steps (DDP needs it)."""
    if world_size <= 1:
        return batches
    usable = len(batches) - len(batches) % world_size
    if usable == 0:
        raise ValueError(f"{len(batches)} batches cannot be shared by {world_size} processes")
    return batches[rank:usable:world_size]


def pad_ids(rows: list[np.ndarray], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows -> (input_ids (B, T), attention_mask (B, T)), padded on the right to the longest row."""
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = r
        mask[i, :len(r)] = 1
    return torch.from_numpy(ids), torch.from_numpy(mask)


def coding_batch(chunks: ChunkSet, index: np.ndarray, n_labels: int, pad_id: int) -> dict:
    """A fine-tuning batch: input_ids (B, T), attention_mask (B, T), labels (B, M) multi-hot float32."""
    ids, mask = pad_ids([chunks.input_ids[i] for i in index], pad_id)
    labels = torch.zeros(len(index), n_labels)
    for row, i in enumerate(index):
        labels[row, torch.from_numpy(chunks.label_ids[i])] = 1.0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# ---------------------------------------------------------------------------------------------------------
# Next sentence prediction pairs (paper §3.2)
