"""What each step of the vocabulary's normaliser costs (figures, not a test): the tokeniser's time in
`bertxml tokenize` and in nightly scoring is mostly this normaliser, and mostly its identifier rules.

    .venv/bin/python benchmarks/normalizer.py [--data ../shared/data | --table DELTA_DIR] [--notes 3000]
                                              [--rounds 3] [--chunking] [--python-re]

Reads real notes in place (MTSamples and CodiEsp corpora; nothing is printed but counts and seconds), or with
`--table` the first notes of a Delta table with a `text` column (a `benchmarks/scale.py` warehouse's
`tables/bertxml/labeled_notes`, generated notes), and times `normalize_str` over them: the whole normaliser
of `bertxml.text.vocab.build_normalizer` with the default VocabConfig, then each step alone (the BERT
clean-up, each placeholder pattern, each identifier rule, digit masking). Best of `rounds`, with the CPU
time per note (all threads). Run it from two checkouts (PYTHONPATH) to compare versions.

`--python-re` adds the same placeholder and identifier rules run with Python's `re` (case-insensitive
`sub`, output string only): the regex engine the tokenizers library uses (Oniguruma) against CPython's.

`--chunking` adds what `bertxml tokenize` does with the normaliser's output, on a vocabulary trained here
on the same notes (kept in memory): the fast tokenizer's `encode_batch` alone, then `chunk_notes` at 512
tokens (the job's Python side: the chunks and each chunk's sentence starts).
"""
from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from tokenizers import Regex, normalizers

from bertxml.config import VocabConfig
from bertxml.platform.deltaread import open_table
from bertxml.text import vocab
from bertxml.text.tokenize import chunk_notes
from machine import cpu_model


def read_notes(data: Path, limit: int) -> list[str]:
    texts = []
    for name in ("mtsamples/corpus.parquet", "codiesp/corpus.parquet"):
        texts += pq.read_table(data / name, columns=["text"]).column("text").to_pylist()
    return [text for text in texts if text][:limit]


def read_table_notes(table: Path, limit: int) -> list[str]:
    """The first `limit` non-empty texts of the Delta table's latest version, read a batch at a time."""
    texts = []
    for batch in pa.RecordBatchReader.from_stream(open_table(table).scan(columns=["text"])):
        texts += [text for text in batch.column("text").to_pylist() if text]
        if len(texts) >= limit:
            break
    return texts[:limit]


def python_rules(texts: list[str]) -> None:
    rules = [(re.compile(pattern.removeprefix("(?i)"), re.IGNORECASE), f" {placeholder} ")
             for pattern, placeholder in vocab.placeholder_patterns()]
    rules += [(re.compile(pattern, re.IGNORECASE), f" {placeholder} ")
              for placeholder, _, pattern in vocab.IDENTIFIER_RULES]
    for text in texts:
        for rule, placeholder in rules:
            text = rule.sub(placeholder, text)


def best_of(fn, rounds: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of the fastest of `rounds` calls."""
    best = (float("inf"), 0.0)
    for _ in range(rounds):
        started, cpu = time.perf_counter(), time.process_time()
        fn()
        best = min(best, (time.perf_counter() - started, time.process_time() - cpu))
    return best


def report(name: str, seconds: tuple[float, float], n: int) -> None:
    wall, cpu = seconds
    print(f"{name:<62} {wall:8.2f} {n / wall:9.0f} {1000 * cpu / n:10.3f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    parser.add_argument("--table", default=None, help="a Delta table of notes (text column) instead of --data")
    parser.add_argument("--notes", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--chunking", action="store_true", help="also time encode_batch and chunk_notes")
    parser.add_argument("--python-re", action="store_true", help="also time the rules in Python's re")
    args = parser.parse_args(argv)
    texts = read_table_notes(Path(args.table), args.notes) if args.table else read_notes(Path(args.data), args.notes)
    print(f"CPU {cpu_model()}")
    print(f"{len(texts)} notes, {sum(map(len, texts)) / len(texts):.0f} characters on average, best of {args.rounds}")
    steps = [("whole normaliser", vocab.build_normalizer(VocabConfig())),
             ("BERT clean-up and lower case", normalizers.BertNormalizer(lowercase=True))]
    steps += [(f"placeholder {placeholder}", normalizers.Replace(Regex(pattern), placeholder))
              for pattern, placeholder in vocab.placeholder_patterns()]
    steps += [(f"identifier rule {i}: {what.split(':')[0]}", normalizers.Replace(Regex("(?i)" + pattern), placeholder))
              for i, (placeholder, what, pattern) in enumerate(vocab.IDENTIFIER_RULES, 1)]
    steps.append(("digit masking", normalizers.Replace(Regex("[0-9]"), "n")))
    print(f"{'step':<62} {'seconds':>8} {'notes/s':>9} {'CPU ms/note':>10}")
    for name, normalizer in steps:
        report(name, best_of(lambda: [normalizer.normalize_str(text) for text in texts], args.rounds), len(texts))
    if args.python_re:
        rules = normalizers.Sequence([normalizer for name, normalizer in steps
                                      if name.startswith(("placeholder", "identifier"))])
        report("placeholders and identifier rules (the tokenizers library)",
               best_of(lambda: [rules.normalize_str(text) for text in texts], args.rounds), len(texts))
        report("placeholders and identifier rules in Python's re", best_of(lambda: python_rules(texts), args.rounds),
               len(texts))
    if args.chunking:
        tokenizer = vocab.train_tokenizer([texts], VocabConfig(size=8000, min_patients=1))
        for name, fn in (("encode_batch (the fast tokenizer, all cores)",
                          lambda: tokenizer.encode_batch(texts, add_special_tokens=False)),
                         ("chunk_notes at 512 (encode_batch + chunks + sentence starts)",
                          lambda: chunk_notes(tokenizer, texts, 512))):
            report(name, best_of(fn, args.rounds), len(texts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
