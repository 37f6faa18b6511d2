"""What each step of the vocabulary's normaliser costs (figures, not a test): the tokeniser's time in
`bertxml tokenize` and in nightly scoring is mostly this normaliser, and mostly its identifier rules.

    .venv/bin/python benchmarks/normalizer.py [--data ../shared/data] [--notes 3000] [--rounds 3] [--chunking]

Reads real notes in place (MTSamples and CodiEsp corpora; nothing is printed but counts and seconds), and
times `normalize_str` over them: the whole normaliser of `bertxml.text.vocab.build_normalizer` with the
default VocabConfig, then each step alone (the BERT clean-up, each placeholder pattern, each identifier
rule, digit masking). Best of `rounds`. Run it from two checkouts (PYTHONPATH) to compare versions.

`--chunking` adds what `bertxml tokenize` does with the normaliser's output, on a vocabulary trained here
on the same notes (kept in memory): the fast tokenizer's `encode_batch` alone, then `chunk_notes` at 512
tokens (the job's Python side: the chunks and each chunk's sentence starts).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import pyarrow.parquet as pq
from tokenizers import Regex, normalizers

from bertxml.config import VocabConfig
from bertxml.text import vocab
from bertxml.text.tokenize import chunk_notes
from machine import cpu_model


def read_notes(data: Path, limit: int) -> list[str]:
    texts = []
    for name in ("mtsamples/corpus.parquet", "codiesp/corpus.parquet"):
        texts += pq.read_table(data / name, columns=["text"]).column("text").to_pylist()
    return [text for text in texts if text][:limit]


def best_seconds(normalizer, texts: list[str], rounds: int) -> float:
    return best_of(lambda: [normalizer.normalize_str(text) for text in texts], rounds)


def best_of(fn, rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    parser.add_argument("--notes", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--chunking", action="store_true", help="also time encode_batch and chunk_notes")
    args = parser.parse_args(argv)
    texts = read_notes(Path(args.data), args.notes)
    print(f"CPU {cpu_model()}")
    print(f"{len(texts)} notes, {sum(map(len, texts)) / len(texts):.0f} characters on average, best of {args.rounds}")
    steps = [("whole normaliser", vocab.build_normalizer(VocabConfig())),
             ("BERT clean-up and lower case", normalizers.BertNormalizer(lowercase=True))]
    steps += [(f"placeholder {placeholder}", normalizers.Replace(Regex(pattern), placeholder))
              for pattern, placeholder in vocab.placeholder_patterns()]
    steps += [(f"identifier rule {i}: {what.split(':')[0]}", normalizers.Replace(Regex("(?i)" + pattern), placeholder))
              for i, (placeholder, what, pattern) in enumerate(vocab.IDENTIFIER_RULES, 1)]
    steps.append(("digit masking", normalizers.Replace(Regex("[0-9]"), "n")))
    print(f"{'step':<62} {'seconds':>8} {'notes/s':>9}")
    for name, normalizer in steps:
        seconds = best_seconds(normalizer, texts, args.rounds)
        print(f"{name:<62} {seconds:8.2f} {len(texts) / seconds:9.0f}")
    if args.chunking:
        tokenizer = vocab.train_tokenizer([texts], VocabConfig(size=8000, min_patients=1))
        for name, fn in (("encode_batch (the fast tokenizer, all cores)",
                          lambda: tokenizer.encode_batch(texts, add_special_tokens=False)),
                         ("chunk_notes at 512 (encode_batch + chunks + sentence starts)",
                          lambda: chunk_notes(tokenizer, texts, 512))):
            seconds = best_of(fn, args.rounds)
            print(f"{name:<62} {seconds:8.2f} {len(texts) / seconds:9.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
