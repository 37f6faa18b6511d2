"""The EHR vocabulary: normalisation, training, and the paper's OOV comparison on hand-made vocabularies."""
import datetime as dt
import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bertxml.platform import tables as t
from bertxml.config import VocabConfig
from bertxml.text.vocab import (PLACEHOLDERS, SPECIAL, SPECIAL_TOKENS, build_normalizer, load_tokenizer,
                                new_tokenizer, run_vocab, sample_patients, save_vocab, train_from_word_counts,
                                train_tokenizer, trainable_words, words_of_documents)
from bertxml.text.oov import load_reference_tokenizer, oov_report, oov_words


def normalized(text, **kw):
    return build_normalizer(VocabConfig(**kw)).normalize_str(text).split()


def test_digits_become_n_and_case_and_accents_go():
    assert normalized("ICD-10-CM Café 2019 x2") == ["icd-nn-cm", "cafe", "nnnn", "xn"]
    assert normalized("ICD-10-CM Café", numbers="keep") == ["icd-10-cm", "cafe"]
    assert normalized("ICD-10 Café", lowercase=False, numbers="keep") == ["ICD-10", "Café"]
    with pytest.raises(ValueError, match="numbers"):
        build_normalizer(VocabConfig(numbers="drop"))


@pytest.mark.parametrize("raw, placeholder", [
    ("[**Known lastname 123**]", "@name@"), ("[**First Name8 (NamePattern2) **]", "@name@"),
    ("[**2151-7-16**]", "@date@"), ("[**Year (4 digits) 2010**]", "@date@"), ("@DATE@", "@date@"),
    ("[**Hospital1 18**]", "@location@"), ("[**Wardname**]", "@location@"),
    ("[**Telephone/Fax (1) 1234**]", "@contact@"), ("[**Pager number 77**]", "@contact@"),
    ("[**Age over 90 **]", "@age@"), ("[**Medical Record Number**]", "@id@"), ("@subnum@", "@id@"),
    ("<NAME>", "@name@"), ('<PHI TYPE="DATE">', "@date@"), ("<PHI>", "@phi@"), ("[**Doe, John**]", "@phi@"),
    ("@foo@", "@phi@"), ("@name@", "@name@"), ("@phi@", "@phi@"),
])
def test_deidentification_placeholders(raw, placeholder):
    assert normalized(f"seen by {raw} today") == ["seen", "by", placeholder, "today"]


def test_what_is_not_a_placeholder():
    assert normalized("BP <140/90> a<b>c @ x") == ["bp", "<nnn/nn>", "a<b>c", "@", "x"]


@pytest.mark.parametrize("raw, placeholder", [
    ("jane.doe@example.org", "@contact@"), ("617-555-0142", "@contact@"), ("(617) 555-0142", "@contact@"),
    ("+1 617.555.0142", "@contact@"), ("2024-03-14", "@date@"), ("03/14/2024", "@date@"), ("14.03.24", "@date@"),
    ("March 14, 2024", "@date@"), ("14 Mar 2024", "@date@"), ("A1234567", "@id@"), ("MRN00482913", "@id@"),
    ("12AB34567", "@id@"),
])
def test_identifiers_become_placeholders(raw, placeholder):
    assert normalized(f"seen {raw} today") == ["seen", placeholder, "today"]
    assert normalized(f"seen {raw} today", mask_identifiers=False) != ["seen", placeholder, "today"]


def test_what_is_not_an_identifier():
    # ICD codes, doses, vitals, ratios, short alphanumerics: digits masked, letters kept
    assert normalized("E11.9 covid19 1000mg HbA1c BP 120/80 x2 1-2-3") == [
        "enn.n", "covidnn", "nnnnmg", "hbanc", "bp", "nnn/nn", "xn", "n-n-n"]
    assert normalized("call 617-555-01425 or 2024-03-145") == ["call", "nnn-nnn-nnnnn", "or", "nnnn-nn-nnn"]


# Planted fake identifiers: each in a few notes of different patients, the surname also repeated many times
# in one patient's notes (occurrences a WordPiece min_frequency would let through).
SURNAME, MRN, PHONE, ACCOUNT = "Quarnstrom", "00482913", "617-555-0142", "ZK7734019"


def planted_corpus(rng):
    common = ["patient", "denies", "chest", "pain", "hypertension", "metformin", "daily", "follow", "up",
              "quarterly", "storm", "mrn", "phone", "account", "seen", "by", "mr", "dr"]
    docs = [(f"P{i}", " ".join(rng.choice(common) for _ in range(25)) + f" MRN {i:08d}.") for i in range(40)]
    planted = [f"Seen by Dr {SURNAME}. MRN {MRN}, phone {PHONE}, account {ACCOUNT}." for _ in range(3)]
    docs += [(f"Q{i}", text) for i, text in enumerate(planted)]                 # three patients
    docs += [("Q0", f"{SURNAME} {SURNAME} {SURNAME} follow up.") for _ in range(10)]  # one patient, often
    return docs


def assert_not_learnt(tokenizer, identifiers):
    vocab = tokenizer.get_vocab()
    for raw in identifiers:
        forms = {raw, raw.lower()}
        masked = build_normalizer(VocabConfig(mask_identifiers=False)).normalize_str(raw).strip()
        if set(masked) - set("n-/.() +"):     # all-digit ones become a shape that every such number shares
            forms.add(masked)
        for form in forms:
            assert form not in vocab and f"##{form}" not in vocab, f"{raw!r} learnt as {form!r}"


def test_planted_identifiers_never_become_tokens():
    docs = planted_corpus(random.Random(3))
    cfg = VocabConfig(size=400, min_frequency=2)
    counts = words_of_documents(docs, cfg)
    assert counts[SURNAME.lower()] == (33, 3)                     # 33 occurrences, 3 patients
    words = trainable_words(counts, cfg.min_patients)
    assert "quarterly" in words and "storm" in words and SURNAME.lower() not in words
    tok = train_from_word_counts(words, cfg)
    assert tok.get_vocab_size() < 400                                # room left: nothing was crowded out
    assert_not_learnt(tok, [SURNAME, MRN, PHONE, ACCOUNT, "zknnnnnnn"])
    assert tok.encode(f"Dr {SURNAME}", add_special_tokens=False).tokens[1] != SURNAME.lower()
    assert "@id@" in tok.encode(f"account {ACCOUNT}").tokens and "@contact@" in tok.encode(PHONE).tokens

    # the guard is what keeps them out: with min_patients 1, or without identifier masking, they are learnt
    loose = train_from_word_counts(trainable_words(counts, 1), cfg)
    assert SURNAME.lower() in loose.get_vocab()
    unmasked = VocabConfig(size=400, min_frequency=2, min_patients=3, mask_identifiers=False)
    raw = train_from_word_counts(trainable_words(words_of_documents(docs, unmasked), 3), unmasked)
    assert "zknnnnnnn" in raw.get_vocab() and SURNAME.lower() in raw.get_vocab()
    with pytest.raises(ValueError, match="min_patients"):
        trainable_words(counts, 0)


def hand_vocab(words):
    return {tok: i for i, tok in enumerate(SPECIAL_TOKENS + PLACEHOLDERS + words)}


def test_placeholders_are_one_token_and_offsets_point_at_the_text():
    tok = new_tokenizer(hand_vocab(["seen", "by", "on"]), VocabConfig())
    enc = tok.encode("Seen by [**Known lastname 12**] on [**2151-7-16**]")
    assert enc.tokens == ["[CLS]", "seen", "by", "@name@", "on", "@date@", "[SEP]"]
    assert tok.token_to_id("@name@") == 5 + PLACEHOLDERS.index("@name@")
    assert enc.offsets[1] == (0, 4)


def test_trained_vocab_has_special_tokens_first_and_its_size(tmp_path):
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghij") for _ in range(rng.randint(3, 9))) for _ in range(400)]
    texts = [" ".join(rng.choice(words) for _ in range(30)) + " 12 mg [**Known lastname 1**]" for _ in range(200)]
    cfg = VocabConfig(size=150, min_frequency=1)
    tok = train_tokenizer([texts[:100], texts[100:]], cfg)
    assert tok.get_vocab_size() == 150
    assert [tok.id_to_token(i) for i in range(5)] == SPECIAL_TOKENS
    assert {name: tok.token_to_id(token) for name, token in zip(SPECIAL, SPECIAL_TOKENS)} == SPECIAL
    assert [tok.id_to_token(5 + i) for i in range(len(PLACEHOLDERS))] == PLACEHOLDERS
    out = save_vocab(tok, cfg, tmp_path / "vocab")
    lines = (out / "vocab.txt").read_text().splitlines()
    assert len(lines) == 150 and lines[:5] == SPECIAL_TOKENS
    again = load_tokenizer(out)
    assert again.encode(texts[0]).ids == tok.encode(texts[0]).ids
    assert json.loads((out / "normalization.json").read_text())["placeholders"]["tokens"] == PLACEHOLDERS


def test_reference_vocabulary_loads_for_real():
    # transformers 5's BertTokenizer(vocab_file=...) maps everything to [UNK]; ours must not.
    ref = load_reference_tokenizer()
    enc = ref.encode("patient", add_special_tokens=False)
    assert len(enc.ids) == 1 and enc.ids[0] != ref.token_to_id("[UNK]")
    assert ref.get_vocab_size() > 30000
    assert ref.encode("Patient 38", add_special_tokens=False).tokens == ["patient", "38"]   # digits kept


def test_oov_per_note_by_hand(tmp_path):
    ours = new_tokenizer(hand_vocab(["the", "patient", "has", "fever", "##s", "n", "##n", "."]), VocabConfig())
    save_vocab(ours, VocabConfig(), tmp_path / "ours")
    ours = load_tokenizer(tmp_path / "ours")
    ref_file = tmp_path / "ref_vocab.txt"
    ref_file.write_text("\n".join(SPECIAL_TOKENS + ["the", "patient", "fever", "##s", "38", ".", "5"]) + "\n")
    ref = load_reference_tokenizer(ref_file)
    notes = ["The patient has fevers 38.5",   # ours: fevers, nn      | ref: has, fevers
             "[**Doe, John**] has fever",     # ours: -               | ref: [ * * doe , john * * ] has
             ""]
    assert oov_words(ours, notes) == [2, 0, 0]
    assert oov_words(ref, notes) == [2, 10, 0]
    report = oov_report(ours, ref, notes, "dev")
    assert report["oov_per_note_ours"] == pytest.approx(2 / 3)
    assert report["oov_per_note_reference"] == pytest.approx(12 / 3)
    assert report["notes"] == 3


def labeled_row(note_id, split, text, codes=("I10",)):
    return (note_id, f"P{note_id}", f"E{note_id}", dt.date(2024, 1, 1), split, text, list(codes), [])


def test_run_vocab_end_to_end(spark, wh, cfg, tmp_path):
    rng = random.Random(1)
    words = ["patient", "denies", "chest", "pain", "hypertension", "metformin", "mg", "daily", "follow", "up"]
    text = lambda: "\n".join(" ".join(rng.choice(words) for _ in range(8)) + " 10 mg ." for _ in range(3))
    rows = [labeled_row(f"t{i}", "train", text()) for i in range(30)]
    rows += [labeled_row("d1", "dev", "Patient denies pain ."), labeled_row("d2", "dev", "zyxwv pain 12 .")]
    wh.write(spark.createDataFrame(rows, t.LABELED_NOTES_SCHEMA), wh.name(t.LABELED_NOTES))
    corpus = tmp_path / "corpus.parquet"
    pq.write_table(pa.table({"note_id": ["c1"], "text": ["bisoprolol twice daily"], "other": ["x"]}), corpus)
    cfg.vocab.size, cfg.vocab.min_frequency = 120, 1
    out = run_vocab(wh, cfg, [f"parquet:{corpus}"], tmp_path / "vocab")
    assert out["texts"] == 31 and out["oov_split"] == "dev" and out["oov_notes"] == 2
    assert out["patient_share"] == 1.0      # vocab.max_notes 0: every train note
    assert out["vocab_size"] <= 120
    tok = load_tokenizer(tmp_path / "vocab")
    # "bisoprolol" is in one corpus text only: fewer than vocab.min_patients (5) documents, never trained on
    assert tok.token_to_id("metformin") is not None and tok.token_to_id("bisoprolol") is None
    assert out["words_trained_on"] < out["distinct_words"]
    report = json.loads((tmp_path / "vocab" / "oov_report.json").read_text())
    # ours: only "zyxwv" is split; BERT uncased: "zyxwv" too (digits kept, "12" is a word it holds).
    assert report["oov_per_note_ours"] == pytest.approx(0.5) == out["oov_per_note_ours"]
    assert report["oov_per_note_reference"] == pytest.approx(0.5)
    assert set(report) >= {"oov_per_note_ours", "oov_per_note_reference", "notes", "min_patients"}
    runs = wh.table(wh.name(t.JOB_RUNS)).filter("job = 'vocab'").collect()
    assert len(runs) == 1 and runs[0].status == "succeeded"
    assert json.loads(runs[0].counts)["vocab_size"] == out["vocab_size"]


def test_vocab_max_notes_reads_whole_patients_of_a_fixed_sample(spark):
    rows = [labeled_row(f"n{p}_{k}", "train", "text") for p in range(200) for k in range(3)]
    notes = spark.createDataFrame([(r[0], f"P{r[0].split('_')[0]}") + r[2:] for r in rows], t.LABELED_NOTES_SCHEMA)
    whole, share = sample_patients(notes, 0)
    assert share == 1.0 and whole.count() == 600
    assert sample_patients(notes, 600)[1] == 1.0
    kept, share = sample_patients(notes, 150)
    assert share == pytest.approx(0.25)
    per_patient = {r[0]: r[1] for r in kept.groupBy("patient_id").count().collect()}
    assert 20 <= len(per_patient) <= 80 and set(per_patient.values()) == {3}   # whole patients, ~50 of 200
    again = sample_patients(notes, 150)[0]
    assert sorted(r[0] for r in again.select("note_id").collect()) == sorted(
        r[0] for r in kept.select("note_id").collect())
    with pytest.raises(ValueError, match="vocab.max_notes"):
        sample_patients(notes, -1)
