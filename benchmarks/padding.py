"""How much of a pre-training batch is padding (figures, not a test): what sequence packing could gain.

    .venv/bin/python benchmarks/padding.py --vocab WORKDIR/vocab [--data ../shared/data] [--max-len 128 512]
                                           [--batch 16] [--epochs 3]

Reads the real unlabelled corpora in place (CodiEsp cases and MTSamples reports; only counts are printed),
chunks them with the vocabulary's tokenizer as `bertxml pretrain` chunks a corpus (`chunk_notes`), and builds
the batches pre-training builds: `bucketed_batches` (shuffled, sorted by length inside windows) and
`pretraining_batch` (next-sentence pairs, MLM masking). It counts the real tokens (attention mask) against
the padded tokens the model computes on, for each chunk length, and the same for batches drawn without the
length buckets. Packed rows (several examples per row, block-diagonal attention) would compute on the real
tokens only: at best they save the padding share printed here, and cost a mask per row that keeps attention
off the fused kernel.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from bertxml.config import PretrainConfig
from bertxml.text.data import ChunkSet, bucketed_batches
from bertxml.text.tokenize import chunk_notes
from bertxml.text.vocab import load_tokenizer
from bertxml.training.inputs import special_ids
from bertxml.training.pretrain import pretraining_batch
from machine import describe_machine

CORPORA = ("codiesp/corpus.parquet", "mtsamples/corpus.parquet")


def corpus_texts(data: Path) -> list[str]:
    texts = []
    for name in CORPORA:
        texts += [t for t in pq.read_table(data / name, columns=["text"]).column("text").to_pylist() if t]
    return texts


def corpus_chunks(texts: list[str], tokenizer, max_len: int) -> ChunkSet:
    chunks = chunk_notes(tokenizer, texts, max_len)
    ids = [f"doc{i:06d}" for i in range(len(texts))]
    return ChunkSet.from_notes(ids, chunks, [[] for _ in ids])


def padding_share(chunks: ChunkSet, batches: list, max_len: int, special: dict, vocab_size: int) -> tuple[int, int]:
    """(real tokens, computed tokens) over the batches, as pre-training builds them."""
    real = computed = 0
    for step, index in enumerate(batches):
        batch = pretraining_batch(chunks, index, nsp=True, seed=13, step=step, max_len=max_len, special=special,
                                  vocab_size=vocab_size, mlm_probability=0.15)
        real += int(batch["attention_mask"].sum())
        computed += int(batch["attention_mask"].numel())
    return real, computed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", required=True, help="a vocabulary folder (WORKDIR/vocab of a retrain)")
    parser.add_argument("--data", default="../shared/data")
    parser.add_argument("--max-len", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--batch", type=int, default=PretrainConfig.batch_size)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    print(describe_machine())
    tokenizer = load_tokenizer(args.vocab)
    special, vocab_size = special_ids(tokenizer), tokenizer.get_vocab_size()
    window = PretrainConfig.bucket_window
    print(f"{'max_len':>7} {'chunks':>7} {'mean len':>8} {'batching':<10} {'real tokens':>12} {'computed':>12} "
          f"{'padding':>8}")
    texts = corpus_texts(Path(args.data))
    for max_len in args.max_len:
        chunks = corpus_chunks(texts, tokenizer, max_len)
        lengths = chunks.lengths + 1  # an NSP pair has one [SEP] more, as pre-training counts it
        rng = np.random.default_rng(13)
        for name, batches in (
                ("buckets", [b for e in range(args.epochs)
                             for b in bucketed_batches(lengths, args.batch, 13, e, window)]),
                ("random", [b for _ in range(args.epochs)
                            for b in np.array_split(rng.permutation(len(chunks)), -(-len(chunks) // args.batch))])):
            real, computed = padding_share(chunks, batches, max_len, special, vocab_size)
            print(f"{max_len:>7} {len(chunks):>7} {float(lengths.mean()):>8.1f} {name:<10} {real:>12,} {computed:>12,} "
                  f"{1 - real / computed:>8.1%}")


if __name__ == "__main__":
    main()
