"""The EHR vocabulary: normalisation, training, and the paper's OOV comparison on hand-made vocabularies."""
import datetime as dt
import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bertxml import tables as t
from bertxml.config import VocabConfig
from bertxml.vocab import (PLACEHOLDERS, SPECIAL, SPECIAL_TOKENS, build_normalizer, load_reference_tokenizer,
                           load_tokenizer, new_tokenizer, oov_report, oov_words, run_vocab, save_vocab,
                           train_tokenizer)


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
    assert normalized("mail j@x.org, BP <140/90> a<b>c") == ["mail", "j@x.org,", "bp", "<nnn/nn>", "a<b>c"]


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
    assert out["vocab_size"] <= 120
    tok = load_tokenizer(tmp_path / "vocab")
    assert tok.token_to_id("metformin") is not None and tok.token_to_id("bisoprolol") is not None
    report = json.loads((tmp_path / "vocab" / "oov_report.json").read_text())
    # ours: only "zyxwv" is split; BERT uncased: "zyxwv" too (digits kept, "12" is a word it holds).
    assert report["oov_per_note_ours"] == pytest.approx(0.5) == out["oov_per_note_ours"]
    assert report["oov_per_note_reference"] == pytest.approx(0.5)
    assert set(report) >= {"oov_per_note_ours", "oov_per_note_reference", "notes"}
    runs = wh.table(wh.name(t.JOB_RUNS)).filter("job = 'vocab'").collect()
    assert len(runs) == 1 and runs[0].status == "succeeded"
    assert json.loads(runs[0].counts)["vocab_size"] == out["vocab_size"]
