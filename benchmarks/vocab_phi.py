"""What the vocabulary's PHI guards cost: vocabulary size and OOV words per dev note at several
`vocab.min_patients`, with and without identifier masking, on a warehouse's labeled_notes (figures, not a test).

    .venv/bin/python benchmarks/vocab_phi.py --workdir warehouse [--size 8000] [--min-patients 1 3 5 10]

Reads `bertxml.labeled_notes` (latest version) with bertxml.platform.deltaread, no Spark: the train notes' words are
counted per patient in plain Python (`words_of_documents`, the same counts `bertxml vocab` makes in Spark),
then one vocabulary is trained per setting and measured on up to 2,000 dev notes (`oov_words`).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from bertxml.config import VocabConfig
from bertxml.platform.deltaread import read_delta
from bertxml.text.oov import oov_words
from bertxml.text.vocab import train_from_word_counts, trainable_words, words_of_documents


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="warehouse")
    parser.add_argument("--size", type=int, default=8000, help="vocab.size (conf/local.yaml: 8,000)")
    parser.add_argument("--min-patients", type=int, nargs="+", default=[1, 3, 5, 10])
    args = parser.parse_args()

    table = read_delta(Path(args.workdir) / "tables" / "bertxml" / "labeled_notes",
                       columns=["note_id", "patient_id", "split", "text"]).to_pylist()
    train = [(r["patient_id"], r["text"]) for r in table if r["split"] == "train"]
    dev = [r["text"] for r in sorted(table, key=lambda r: r["note_id"]) if r["split"] == "dev"][:2000]
    print(f"{len(train)} train notes of {len({p for p, _ in train})} patients, {len(dev)} dev notes")
    print("mask_identifiers  min_patients  distinct_words  words_trained_on  occurrences_kept  vocab_size  "
          "oov_per_dev_note  train_s")
    for mask in (False, True):
        cfg = VocabConfig(size=args.size, mask_identifiers=mask)
        counts = words_of_documents(train, cfg)
        total = sum(n for n, _ in counts.values())
        for k in args.min_patients:
            start = time.perf_counter()
            words = trainable_words(counts, k)
            tok = train_from_word_counts(words, cfg)
            seconds = time.perf_counter() - start
            oov = oov_words(tok, dev)
            print(f"{str(mask):<17} {k:<13} {len(counts):<15} {len(words):<17} "
                  f"{sum(words.values()) / total:<17.4f} {tok.get_vocab_size():<11} "
                  f"{sum(oov) / max(len(dev), 1):<17.2f} {seconds:.1f}", flush=True)


if __name__ == "__main__":
    main()
