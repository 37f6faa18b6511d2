"""Tests for bertxml/scoring/ (score, engine, evidence, predictors, udf): the engine
(`make_predict_fn`) on a tiny model without Spark, then the nightly
job end to end on a tiny warehouse (two nights of notes, bad rows of each kind).

Run: .venv/bin/python -m pytest -q tests/test_score.py

`make_model_dir` builds a complete model folder (tiny random BertForIcdCoding, a WordPiece vocabulary
trained on a few sentences, label_vocab.json, thresholds.json, manifest.json); test_evaluate.py and
test_explain.py import it.
"""
import datetime as dt
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from pyspark.sql import functions as F

from bertxml.platform import tables as t
from bertxml.config import ModelConfig, VocabConfig
from bertxml.models.bert import BertForIcdCoding, bert_config, save_model
from bertxml.models.modeldir import predicted_codes, top_codes, write_model_dir
from bertxml.models.precision import cpu_has_native_bf16, decide_precision
from bertxml.scoring.predictors import PREDICTORS, make_predict_fn, read_model_info, register_predictor
from bertxml.models.modeldir import ModelDirError
from bertxml.scoring.score import NoNotesError, run_score
from bertxml.scoring.engine import label_attention_blocked, label_attention_sdpa
from bertxml.scoring.udf import score_frames
from bertxml.text.tokenize import encode_chunks
from bertxml.text.vocab import train_tokenizer

SENTENCES = [
    "Patient with hypertension presents for follow up of blood pressure.",
    "History of type 2 diabetes mellitus without complications, on metformin.",
    "Asthma exacerbation with wheezing and cough, albuterol given.",
    "Low back pain radiating to the left leg after lifting boxes.",
    "Chronic cough for three weeks, chest x-ray unremarkable.",
    "Right hip pain after a fall, status post labral repair.",
    "Blood pressure well controlled on lisinopril, continue current regimen.",
    "Diabetic foot exam normal, hemoglobin a1c improved since last visit.",
]
CODES = ["E11.9", "I10", "J45.909", "M54.5", "R05.9"]
D1, D2 = dt.date(2025, 3, 1), dt.date(2025, 3, 2)
MAX_LEN = 16


def make_model_dir(root, version="bertxml-test-a", head="bertxml", codes=CODES, seed=0, max_len=MAX_LEN,
                   thresholds=None, kind=None, weight_labels=None) -> Path:
    """A finished model folder under root/version. weight_labels != len(codes) makes a broken folder
    (weights for another label vocabulary)."""
    out = Path(root) / version
    out.mkdir(parents=True)
    tokenizer = train_tokenizer([SENTENCES * 3], VocabConfig(size=300, min_frequency=1, min_patients=1))
    tokenizer.save(str(out / "tokenizer.json"))
    torch.manual_seed(seed)
    mcfg = ModelConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       max_position_embeddings=64, max_len=max_len, head=head)
    model = BertForIcdCoding(bert_config(mcfg, tokenizer.get_vocab_size()), weight_labels or len(codes), head)
    save_model(model, out)
    labels = [{"label_index": i, "code": c, "description": f"description of {c}", "train_count": 1000 * (i + 1),
               "is_chronic": c == "I10"} for i, c in enumerate(codes)]
    write_model_dir(out, model_version=version, model_kind=kind or head, config={}, inputs={}, max_len=max_len,
                    dev_metrics={}, parameters=0, train_seconds=0.0, tokenizer_file=out / "tokenizer.json",
                    label_vocab=labels, thresholds=thresholds or {c: 0.5 for c in codes})
    return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("models"))


LONG = " ".join(SENTENCES * 4)


def by_hand(model_dir, text, max_chunks=None):
    """Note probabilities the slow, obvious way: each chunk alone (no padding), sigmoid, max."""
    from bertxml.models.bert import load_model
    from bertxml.text.vocab import load_tokenizer

    model = load_model(model_dir)
    chunks = encode_chunks(load_tokenizer(model_dir), [text], MAX_LEN)[0][:max_chunks]
    with torch.no_grad():
        probs = [torch.sigmoid(model(torch.tensor([c]))["logits"])[0] for c in chunks]
    return torch.stack(probs).max(dim=0).values.numpy(), len(chunks)


# ---- the engine, without Spark ----------------------------------------------------------------------------
def test_predict_fn_shapes_and_max_over_chunks(model_dir):
    texts = [SENTENCES[0], LONG, "", SENTENCES[2] + " " + SENTENCES[3]]
    predict = make_predict_fn(model_dir, device="cpu", batch_size=2, cpu_bf16=False)
    assert predict.fused_head is label_attention_sdpa  # one SDPA call, checked against the module at load
    probs = predict(texts)
    assert probs.shape == (4, len(CODES)) and probs.dtype == np.float32
    assert ((probs > 0) & (probs < 1)).all()
    for text, row in zip(texts, probs):
        expected, _ = by_hand(model_dir, text)
        np.testing.assert_allclose(row, expected, atol=1e-5)
    # Bucketing and batch size change which chunks share a padded pass, never the result.
    np.testing.assert_allclose(make_predict_fn(model_dir, device="cpu", batch_size=64, cpu_bf16=False)(texts),
                               probs, atol=1e-5)
    np.testing.assert_allclose(predict(np.array(texts, dtype=object)), probs, atol=1e-6)
    bf16 = make_predict_fn(model_dir, device="cpu", cpu_bf16=True)     # bf16 weights: close, not equal
    assert bf16.fused_head is label_attention_blocked                  # label blocks, not CPU SDPA
    assert np.abs(bf16(texts) - probs).max() < 2e-2
    # auto: the one precision decision (bf16 weights only where this CPU multiplies bf16 natively)
    auto = make_predict_fn(model_dir, device="cpu")
    assert auto.precision == decide_precision("cpu") and auto.bf16 == cpu_has_native_bf16()
    assert next(auto.model.parameters()).dtype == auto.precision.dtype
    scored = predict.score(texts)
    assert scored.n_chunks.tolist()[0] == 1 and scored.n_chunks[1] > 3 and scored.n_tokens[2] == 0
    assert not scored.truncated.any()


def test_long_note_is_scored_on_its_first_chunks(model_dir):
    scored = make_predict_fn(model_dir, device="cpu", max_chunks_per_note=3, cpu_bf16=False).score(
        [LONG, SENTENCES[1]])
    assert scored.n_chunks.tolist() == [3, 1] and scored.truncated.tolist() == [True, False]
    expected, n = by_hand(model_dir, LONG, max_chunks=3)
    np.testing.assert_allclose(scored.probs[0], expected, atol=1e-5)


# ---- evidence: the predicted codes' most attended spans --------------------------------------------------
KEYWORD = "hypertension"


def keyed_model_dir(root, max_len=64) -> Path:
    """A model folder whose label attention for I10 keys on the word "hypertension": I10's label vector is
    fitted (Adam on that one vector, the encoder frozen) to put eq. 2's attention on the word's tokens in
    chunks of notes made of the test sentences in many orders, and eq. 4 reads the direction d from the
    other tokens' states to the word's out of the attended state (logit = relu(d/|d| . c_j)), so the chunk
    holding the word sets the probability. I10 is always predicted, the other codes never."""
    from bertxml.models.bert import load_model
    from bertxml.text.vocab import load_tokenizer

    out = make_model_dir(root, "bertxml-keyed", max_len=max_len,
                         thresholds={c: (0.0 if c == "I10" else 1.1) for c in CODES})
    model, tokenizer = load_model(out), load_tokenizer(out)
    body = max_len - 2
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    states, on_word = [], []  # per chunk: (T, H) token states, (T,) True on the keyword's tokens
    with torch.no_grad():
        for shift in range(len(SENTENCES)):
            order = SENTENCES[shift:] + SENTENCES[:shift]
            for sep in (" ", "\n"):
                text = sep.join(order)
                enc = tokenizer.encode(text, add_special_tokens=False)
                at = text.find(KEYWORD)
                for first in range(0, len(enc.ids), body):
                    ids = [cls_id, *enc.ids[first:first + body], sep_id]  # as the engine's chunks
                    offsets = [(-1, -1), *enc.offsets[first:first + body], (-1, -1)]
                    states.append(model.bert(torch.tensor([ids])).last_hidden_state[0])
                    on_word.append(torch.tensor([at <= a < at + len(KEYWORD) for a, _ in offsets]))
    word = torch.cat([h[m] for h, m in zip(states, on_word)])
    other = torch.cat([h[~m] for h, m in zip(states, on_word)])
    direction = word.mean(0) - other.mean(0)  # (H,)
    vector = (direction * (20.0 / direction.dot(direction))).clone().requires_grad_(True)
    optimizer = torch.optim.Adam([vector], lr=0.05)
    keyed = [(h, m) for h, m in zip(states, on_word) if m.any()]
    for _ in range(300):  # maximise the attention mass on the word, in every chunk that holds it
        optimizer.zero_grad()
        loss = -sum(torch.logsumexp((h @ vector)[m], 0) - torch.logsumexp(h @ vector, 0) for h, m in keyed)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        model.head.label_vectors[CODES.index("I10")] = vector.detach()
        for layer in (model.head.w_b, model.head.w_a):
            layer.weight.zero_()
            layer.bias.zero_()
        model.head.w_b.weight[0] = direction / direction.norm()
        model.head.w_a.weight[0, 0] = 1.0
    save_model(model, out)
    return out


def test_evidence_puts_the_sentence_stating_the_code_first(tmp_path):
    """I10 (hypertension) is stated in one sentence of the note: its rank-1 span is exactly that sentence,
    also when the sentence sits in a later chunk; the spans carry eq. 2's attention (the model's own head)."""
    from bertxml.reports.explain import explain_text

    model_dir = keyed_model_dir(tmp_path)
    predict = make_predict_fn(model_dir, device="cpu", cpu_bf16=False, evidence_top_k=3)
    stated = SENTENCES[0]
    short = SENTENCES[3] + " " + stated + "\n" + SENTENCES[4]
    before = []  # sentences enough to push the stated one into the long note's second chunk (62 tokens each)
    for i in (2, 3, 4, 5, 6, 7, 1):
        before.append(SENTENCES[i])
        if len(predict.tokenizer.encode(" ".join(before), add_special_tokens=False).ids) >= 62:
            break
    long_ = " ".join(before) + "\n" + stated + " " + SENTENCES[4]
    scored = predict.score([short, long_, SENTENCES[5]])
    assert scored.n_chunks[0] == 1 and scored.n_chunks[1] >= 2
    for text, spans in zip([short, long_], scored.evidence):
        assert {s["code"] for s in spans} == {"I10"}  # the predicted codes only (the others never are)
        assert [s["rank"] for s in spans] == [1, 2, 3]
        first = spans[0]
        assert (first["char_start"], first["char_end"]) == (text.index(stated), text.index(stated) + len(stated))
        assert first["weight"] > 0.5 and [s["weight"] for s in spans] == sorted((s["weight"] for s in spans),
                                                                                reverse=True)
        for s in spans[1:]:  # the other spans are other sentences, not overlapping the first
            assert s["char_end"] <= first["char_start"] or s["char_start"] >= first["char_end"]
    # The weights are the module's attention (return_attention) summed over the span's tokens.
    explained = explain_text(predict, short, code="I10")["codes"][0]
    offsets = predict.tokenizer.encode(short, add_special_tokens=False).offsets
    for s in scored.evidence[0]:
        inside = sum(w for tok, w in explained["_weights"].items()
                     if s["char_start"] <= offsets[tok][0] < s["char_end"])
        assert s["weight"] == pytest.approx(inside, abs=1e-5)
    np.testing.assert_allclose(scored.probs, make_predict_fn(model_dir, device="cpu", cpu_bf16=False)(
        [short, long_, SENTENCES[5]]), atol=1e-6)  # evidence leaves the probabilities as they were
    # Off by default in the engine; a cls model has no label attention, so no evidence either.
    assert make_predict_fn(model_dir, device="cpu").score([short]).evidence is None
    cls = make_predict_fn(make_model_dir(tmp_path, "cls-y", head="cls"), device="cpu", evidence_top_k=3)
    assert cls.score([short]).evidence is None


def test_evidence_spans_are_sentences_cut_at_span_tokens():
    from bertxml.scoring.evidence import evidence_spans, span_breaks

    text = "Aa bb. Cc dd ee ff gg\nHh ii; jj 2.5 kk"
    breaks = span_breaks(text)
    assert breaks.tolist() == [6, 22, 28]  # after '. ', the line break and '; ', not inside "2.5"
    words = [(m.start(), m.end()) for m in re.finditer(r"\S+", text)]
    starts, ends = np.array([w[0] for w in words]), np.array([w[1] for w in words])
    weights = np.array([0.0, 0.05, 0.05, 0.1, 0.1, 0.1, 0.1, 0.2, 0.1, 0.1, 0.05, 0.05, 0.0, 0.0])  # [CLS] .. [SEP]
    spans = evidence_spans(weights, 0, 64, starts, ends, breaks, top_k=5, span_tokens=3)
    got = [(text[a:b], round(w, 3)) for a, b, w in spans]
    assert got == [("Cc dd ee", 0.3), ("ff gg", 0.3), ("Hh ii;", 0.2), ("Aa bb.", 0.1), ("jj 2.5 kk", 0.1)]
    # Chunk 1 of max_len 4 holds note tokens 2 and 3 (two tokens a chunk after [CLS]).
    assert evidence_spans(np.array([0, 0.3, 0.7, 0]), 1, 4, starts, ends, breaks, 2, 32) == [
        (7, 12, pytest.approx(1.0))]


def test_top_and_predicted_codes():
    probs = np.array([[0.1, 0.9, 0.5, 0.7], [0.3, 0.2, 0.1, 0.05]], dtype=np.float32)
    codes = np.array(["A", "B", "C", "D"], dtype=object)
    assert [[c["code"] for c in row] for row in top_codes(probs, codes, 2)] == [["B", "D"], ["A", "B"]]
    assert top_codes(probs, codes, 9)[0][0] == {"code": "B", "probability": pytest.approx(0.9)}
    thresholds = np.array([0.3, 0.95, 0.5, 0.5], dtype=np.float32)
    assert predicted_codes(probs, codes, thresholds) == [["C", "D"], ["A"]]


def test_model_dir_problems_are_clear_errors(tmp_path, model_dir):
    broken = make_model_dir(tmp_path, "bertxml-broken", weight_labels=len(CODES) + 2)
    with pytest.raises(ModelDirError, match="label vocabularies|labels"):
        read_model_info(broken)
    with pytest.raises(ModelDirError, match="manifest"):
        read_model_info(tmp_path)
    unknown = make_model_dir(tmp_path, "odd-kind", kind="no-such-kind")
    with pytest.raises(ModelDirError, match="no-such-kind"):
        make_predict_fn(unknown)
    info = read_model_info(model_dir)
    assert info.codes == tuple(CODES) and info.model_version == "bertxml-test-a" and info.max_len == MAX_LEN


def test_a_registered_model_kind_scores_through_the_udf_body(tmp_path):
    """A baseline kind plugs in with register_predictor; the UDF body handles a probabilities-only predictor."""
    import pandas as pd

    d = tmp_path / "logreg-x"
    d.mkdir()
    labels = [{"label_index": i, "code": c, "description": None, "train_count": 1, "is_chronic": False}
              for i, c in enumerate(CODES[:3])]
    write_model_dir(d, model_version="logreg-x", model_kind="test-logreg", config={}, inputs={}, max_len=0,
                    dev_metrics={}, parameters=0, train_seconds=0.0, tokenizer_file=Path(__file__),
                    label_vocab=labels, thresholds={"I10": 0.25})
    register_predictor("test-logreg", lambda model_dir, device: lambda texts: np.tile(
        np.array([0.1, 0.3, 0.2], dtype=np.float32), (len(texts), 1)))
    try:
        frames = [pd.DataFrame({"note_id": ["a", "b"], "text": ["x", "y"]}), pd.DataFrame({"note_id": [], "text": []})]
        cols = ["note_id", "n_chunks", "truncated", "reason", "probabilities", "top_codes", "predicted_codes"]
        out = pd.concat(score_frames(iter(frames), str(d), "cpu", {}, 2, cols))
    finally:
        PREDICTORS.pop("test-logreg")
    assert out["note_id"].tolist() == ["a", "b"] and out["reason"].isna().all()
    assert out["predicted_codes"].iloc[0] == ["I10"]           # 0.3 >= 0.25; the others at the 0.5 default
    assert [c["code"] for c in out["top_codes"].iloc[0]] == ["I10", "J45.909"]


# ---- the nightly job --------------------------------------------------------------------------------------
def note(note_id, date, text, patient="P1", note_type="progress_note", status="final"):
    return (note_id, patient, f"E-{note_id}", date, note_type, "physician", status, text)


def write_notes(wh, rows, bad_utf8=()):
    """ehr.notes from rows; bad_utf8: (note_id, date, raw bytes) rows whose text is not valid UTF-8."""
    spark = wh.spark
    df = spark.createDataFrame(rows, t.NOTES_SCHEMA)
    if bad_utf8:
        raw = spark.createDataFrame([(n, "P9", f"E-{n}", d, "progress_note", "physician", "final", bytearray(b))
                                     for n, d, b in bad_utf8],
                                    "note_id string, patient_id string, encounter_id string, note_date date, "
                                    "note_type string, author_role string, status string, text binary")
        df = df.unionByName(raw.withColumn("text", F.col("text").cast("string")))
    wh.write(df, "ehr.notes")


NIGHT1 = [note("n1", D1, SENTENCES[0] + " " + SENTENCES[6]), note("n2", D1, SENTENCES[1] + " " + SENTENCES[7]),
          note("n3", D1, LONG), note("n4", D1, SENTENCES[2] + " " + SENTENCES[4]),
          note("empty", D1, "   "), note("short", D1, "bp ok"), note("zw", D1, "\u200b" * 60),
          note("err", D1, SENTENCES[3], status="erroneous"),
          note("dup", D1, SENTENCES[5] + " " + SENTENCES[0]), note("dup", D1, SENTENCES[5] + " " + SENTENCES[0])]
NIGHT2 = [note("m1", D2, SENTENCES[3] + " " + SENTENCES[5]), note("m2", D2, SENTENCES[4] + " " + SENTENCES[2])]
BAD = [("bad", D1, b"Patient seen \xff\xfe\xfd for follow up of hypertension, continue lisinopril daily.")]


def predictions(wh):
    return {(r.note_id, r.model_version): r for r in wh.table(wh.name(t.PREDICTIONS)).collect()}


def evidence(wh):
    """bertxml.evidence as sorted tuples without the run id: every row, so a duplicate counts."""
    return sorted(tuple(r)[:-1] for r in wh.table(wh.name(t.EVIDENCE)).collect())


def check_evidence(rows, preds, texts, top_k):
    """Every predicted code of every note has 1..top_k spans ranked 1, 2, ... inside the note's text, by
    falling weight; no row for a code that is not predicted."""
    spans = {}
    for note_id, _, version, code, rank, start, end, weight in rows:
        spans.setdefault((note_id, version, code), []).append((rank, start, end, weight))
    assert set(spans) == {(k[0], k[1], c) for k, r in preds.items() for c in (r.predicted_codes or [])}
    for (note_id, _, _), found in spans.items():
        found.sort()
        assert [x[0] for x in found] == list(range(1, len(found) + 1)) and len(found) <= top_k
        assert all(0 <= a < b <= len(texts[note_id]) and w > 0 for _, a, b, w in found)
        assert [x[3] for x in found] == sorted((x[3] for x in found), reverse=True)


def test_run_score_end_to_end(wh, cfg, tmp_path):
    # The module's model with I10 always predicted (threshold 0), so every note has a code and its evidence.
    thresholds = {c: (0.0 if c == "I10" else 0.5) for c in CODES}
    model_dir = make_model_dir(tmp_path / "models", thresholds=thresholds)
    write_notes(wh, NIGHT1 + NIGHT2, bad_utf8=BAD)
    cfg.score.max_chunks_per_note = 3
    cfg.score.top_k = 3
    cfg.score.partitions = 1      # one Python worker imports torch: the slow part of a tiny test
    cfg.score.cpu_bf16 = "false"  # fp32, to compare with the model's own forward to 1e-5

    first = run_score(wh, cfg, date="2025-03-01", model_dir=model_dir)
    preds = predictions(wh)
    assert {k[0] for k in preds} == {"n1", "n2", "n3", "n4", "dup"}     # that night only, duplicates once
    row = preds[("n1", "bertxml-test-a")]
    assert row.note_date == D1 and row.patient_id == "P1" and len(row.probabilities) == len(CODES)
    assert [c.code for c in row.top_codes] == [CODES[i] for i in np.argsort(-np.array(row.probabilities))[:3]]
    assert row.predicted_codes == [c for c, p in zip(CODES, row.probabilities) if p >= thresholds[c]]
    np.testing.assert_allclose(row.probabilities, by_hand(model_dir, NIGHT1[0][-1])[0], atol=1e-5)
    assert preds[("n3", "bertxml-test-a")].truncated and preds[("n3", "bertxml-test-a")].n_chunks == 3
    assert first["notes_read"] == 11 and first["notes_scored"] == 5 and first["notes_truncated"] == 1
    assert "has no drift_profile.json" in first["drift"]     # an older model folder: drift skipped, said why
    assert not wh.exists(wh.name(t.NIGHT_DRIFT))
    assert first["rejected_by_reason"] == {"bad_text": 1, "dropped_status": 1, "duplicate_row": 1,
                                           "empty_text": 1, "no_tokens": 1, "short_text": 1}
    rejects = wh.table(wh.name(t.REJECTS)).filter("job = 'score'").collect()
    assert sorted((r.note_id, r.reason, r.batch) for r in rejects) == sorted(
        [("bad", "bad_text", "2025-03-01"), ("err", "dropped_status", "2025-03-01"),
         ("dup", "duplicate_row", "2025-03-01"), ("empty", "empty_text", "2025-03-01"),
         ("zw", "no_tokens", "2025-03-01"), ("short", "short_text", "2025-03-01")])
    assert all("Patient" not in (r.record or "") for r in rejects)       # never the text
    assert wh.table(wh.name(t.MODEL_LABELS)).count() == len(CODES)
    assert {r.code for r in wh.spark.sql("SELECT code FROM bertxml.predicted_codes").collect()} <= set(CODES)
    ev = evidence(wh)
    texts = {r[0]: r[-1] for r in NIGHT1 + NIGHT2}
    assert first["evidence_spans"] == len(ev) > 0 and {r[1] for r in ev} == {D1}
    check_evidence(ev, preds, texts, top_k=3)

    # A rerun of the night leaves the tables as one run would: same keys, no row twice.
    run_score(wh, cfg, date=dt.date(2025, 3, 1), model_dir=model_dir)
    again = predictions(wh)
    assert again.keys() == preds.keys() and wh.table(wh.name(t.PREDICTIONS)).count() == len(preds)
    for key, r in preds.items():
        np.testing.assert_allclose(again[key].probabilities, r.probabilities, atol=1e-6)
        assert again[key].predicted_codes == r.predicted_codes and again[key].n_chunks == r.n_chunks
    assert wh.table(wh.name(t.REJECTS)).filter("job = 'score'").count() == 6
    assert wh.table(wh.name(t.MODEL_LABELS)).count() == len(CODES)
    assert wh.table(wh.name(t.EVIDENCE)).count() == len(ev)            # counted: no span twice
    assert [r[:7] for r in evidence(wh)] == [r[:7] for r in ev]
    np.testing.assert_allclose([r[7] for r in evidence(wh)], [r[7] for r in ev], atol=1e-6)

    # Catch-up: the nights holding a note neither scored nor rejected (night 2), processed as nights.
    caught_up = run_score(wh, cfg, since_last=True, model_dir=model_dir)
    assert caught_up["batches"] == ["2025-03-02"] and caught_up["notes_scored"] == 2 and caught_up["rejected"] == 0
    assert {k[0] for k in predictions(wh)} == {"n1", "n2", "n3", "n4", "dup", "m1", "m2"}
    assert wh.table(wh.name(t.REJECTS)).filter("job = 'score'").count() == 6
    assert run_score(wh, cfg, since_last=True, model_dir=model_dir)["notes_scored"] == 0

    # A second model version is scored side by side; its label vocabulary travels with its folder.
    other = make_model_dir(tmp_path / "models", "cls-test-b", head="cls", codes=CODES[:3], seed=1)
    run_score(wh, cfg, date="2025-03-02", model_dir=other)
    preds = predictions(wh)
    assert len(preds[("m1", "cls-test-b")].probabilities) == 3 and ("m1", "bertxml-test-a") in preds
    assert wh.table(wh.name(t.MODEL_LABELS)).filter("model_version = 'cls-test-b'").count() == 3
    runs = wh.table(wh.name(t.JOB_RUNS)).filter("job = 'score'").collect()
    assert len(runs) == 5 and {r.status for r in runs} == {"succeeded"}
    counts = json.loads(sorted(runs, key=lambda r: r.started_at)[0].counts)
    assert counts["chunks"] >= 7 and counts["notes_per_s"] > 0
    assert wh.table(wh.name(t.PREDICTIONS)).inputFiles() and _partition_columns(wh) == ["note_date"]

    # Night 1 rerun after the feed changed: n4 now erroneous, n2 gone. Their old rows go in the same MERGE;
    # night 2 and the other model version's rows stay as they were.
    before = predictions(wh)
    changed = [r for r in NIGHT1 if r[0] not in ("n2", "n4")] + [note("n4", D1, NIGHT1[3][-1], status="erroneous")]
    write_notes(wh, changed + NIGHT2, bad_utf8=BAD)
    run_score(wh, cfg, date=D1, model_dir=model_dir)
    after = predictions(wh)
    assert wh.table(wh.name(t.PREDICTIONS)).count() == len(after) == len(before) - 2
    assert set(before) - set(after) == {("n2", "bertxml-test-a"), ("n4", "bertxml-test-a")}
    for key in [k for k in after if k[0] in ("m1", "m2")]:
        assert after[key].run_id == before[key].run_id          # another night: not rewritten
    assert sorted(r.note_id for r in wh.table(wh.name(t.REJECTS)).filter(
        "job = 'score' AND reason = 'dropped_status'").collect()) == ["err", "n4"]
    check_evidence(evidence(wh), {k: r for k, r in after.items() if k[1] == "bertxml-test-a"}, texts, top_k=3)
    assert len(evidence(wh)) == len([r for r in ev if r[0] not in ("n2", "n4")]) + len(
        [r for r in evidence(wh) if r[1] == D2])

    # Every note of the night now rejected: the rerun only deletes the night's rows.
    write_notes(wh, [note(n, D1, "bp ok") for n in ("n1", "n3", "dup")] + NIGHT2)
    assert run_score(wh, cfg, date=D1, model_dir=model_dir)["notes_scored"] == 0
    assert {k[0] for k in predictions(wh)} == {"m1", "m2"} and wh.table(wh.name(t.PREDICTIONS)).count() == 4
    assert {r[0] for r in evidence(wh)} <= {"m1", "m2"}

    # score.evidence off: the night's spans of the model version go (the table never disagrees with the
    # predictions), and no evidence is computed.
    cfg.score.evidence = False
    assert run_score(wh, cfg, date=D2, model_dir=model_dir)["evidence_spans"] == 0
    assert evidence(wh) == []


def _partition_columns(wh):
    from delta.tables import DeltaTable

    return DeltaTable.forPath(wh.spark, str(wh.path(wh.name(t.PREDICTIONS)))).detail().first().partitionColumns


def test_run_score_fails_clearly(wh, cfg, model_dir, tmp_path):
    write_notes(wh, NIGHT2)
    broken = make_model_dir(tmp_path, "bertxml-broken", weight_labels=len(CODES) + 1)
    with pytest.raises(ModelDirError, match="label"):
        run_score(wh, cfg, date=D2, model_dir=broken)
    with pytest.raises(NoNotesError, match="2025-03-05"):
        run_score(wh, cfg, date="2025-03-05", model_dir=model_dir)
    with pytest.raises(ValueError, match="YYYY-MM-DD"):
        run_score(wh, cfg, date="03/05/2025", model_dir=model_dir)
    statuses = [r.status for r in wh.table(wh.name(t.JOB_RUNS)).collect()]
    assert len(statuses) == 2 and all(s.startswith("failed") for s in statuses)  # the bad date: before the job
    assert not wh.exists(wh.name(t.PREDICTIONS))


# ---- operating points, bands and encounters -----------------------------------------------------------------
def test_operating_points_by_hand():
    from bertxml.training.thresholds import operating_points

    # One code, ten dev notes, best first: + + + - + - - + - -  (5 positives).
    probs = np.array([0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2], dtype=np.float32)[:, None]
    labels = np.array([1, 1, 1, 0, 1, 0, 0, 1, 0, 0])[:, None]
    rare = np.zeros((10, 1), dtype=np.int64)
    rare[0] = 1
    points = operating_points(np.hstack([probs, probs]), np.hstack([labels, rare]), ["A", "B"],
                              np.array([0.7, 0.95], dtype=np.float32), auto_precision=0.9, review_recall=0.9,
                              min_support=3)["codes"]
    a = points["A"]
    assert a["support"] == 5 and a["f1"] == {"threshold": pytest.approx(0.7), "precision": 0.8, "recall": 0.8}
    # precision >= 0.9 first fails at the 4th note: the lowest such threshold is the 3rd note's score
    assert a["auto"] == {"threshold": pytest.approx(0.85), "precision": 1.0, "recall": 0.6}
    # recall >= 0.9 needs all 5 positives: down to the 8th note
    assert a["review"] == {"threshold": pytest.approx(0.4), "precision": 5 / 8, "recall": 1.0}
    # one dev positive: too rare for bands, F1 point only
    assert points["B"]["auto"] is None and points["B"]["review"] is None and points["B"]["support"] == 1


def test_band_targets_are_checked():
    from bertxml.config import ConfigError
    from bertxml.config_io import load_config

    assert load_config(sets=["bands.auto_precision=0.95"]).bands.auto_precision == 0.95
    for bad in ("bands.auto_precision=1.5", "bands.review_recall=0", "bands.min_support=0"):
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            load_config(sets=[bad])


def test_bands_follow_the_operating_points(tmp_path):
    from bertxml.models.modeldir import OPERATING_POINTS_FILE, write_json
    from bertxml.models.modeldir import predicted_bands

    model = make_model_dir(tmp_path, thresholds={c: 0.5 for c in CODES})
    info = read_model_info(model)  # no operating_points.json: F1 thresholds, every code 'review'
    probs = np.array([[0.6, 0.95, 0.3, 0.1, 0.7]], dtype=np.float32)
    assert predicted_bands(probs, info) == ([["E11.9", "I10", "R05.9"]], [["review", "review", "review"]])
    point = {"support": 40, "f1": {"threshold": 0.5, "precision": 0.8, "recall": 0.8},
             "auto": {"threshold": 0.9, "precision": 0.92, "recall": 0.5},
             "review": {"threshold": 0.25, "precision": 0.4, "recall": 0.91}}
    write_json(model / OPERATING_POINTS_FILE, {"targets": {}, "codes": {"I10": point, "J45.909": point}})
    info = read_model_info(model)
    # I10 0.95 >= its auto threshold; J45.909 0.3 is under F1 but over its review threshold: predicted, review;
    # E11.9 and R05.9 have no points (too rare on dev): predicted at F1, always review
    assert predicted_bands(probs, info) == ([["E11.9", "I10", "J45.909", "R05.9"]],
                                            [["review", "auto", "review", "review"]])
    rows = {r[2]: r for r in info.label_rows()}
    assert rows["I10"][5:] == (40, pytest.approx(0.8), pytest.approx(0.8), pytest.approx(0.9), pytest.approx(0.92),
                               0.5, pytest.approx(0.25), pytest.approx(0.4), pytest.approx(0.91))
    assert rows["E11.9"][5:] == (None,) * 9


def encounters(wh):
    return {(r.encounter_id, r.model_version): r for r in wh.table(wh.name(t.ENCOUNTER_PREDICTIONS)).collect()}


def test_encounter_predictions_over_nights_and_reruns(wh, cfg, tmp_path):
    from bertxml.models.modeldir import OPERATING_POINTS_FILE, write_json

    def enc(note_id, date, text, encounter, status="final"):
        return (note_id, "P1" if encounter != "EC" else "P2", encounter, date, "progress_note", "physician",
                status, text)

    # EA's notes arrive over two nights; EB has one note on night 1, EC one on night 2.
    notes = [enc("a1", D1, SENTENCES[0] + " " + SENTENCES[6], "EA"), enc("b1", D1, SENTENCES[1], "EB"),
             enc("a2", D2, SENTENCES[2] + " " + SENTENCES[4], "EA"), enc("c1", D2, SENTENCES[3], "EC")]
    write_notes(wh, notes)
    cfg.score.partitions = 1
    cfg.score.cpu_bf16 = "false"
    points = {"I10": {"support": 40, "f1": None, "auto": {"threshold": 0.0, "precision": 0.95, "recall": 1.0},
                      "review": {"threshold": 0.0, "precision": 0.95, "recall": 1.0}}}
    model_dir = make_model_dir(tmp_path / "models")  # the same weights as the module's, with bands
    write_json(model_dir / OPERATING_POINTS_FILE, {"targets": {}, "codes": points})
    run_score(wh, cfg, date=D1, model_dir=model_dir)
    first = encounters(wh)
    assert sorted(k[0] for k in first) == ["EA", "EB"] and first[("EA", "bertxml-test-a")].n_notes == 1
    run_score(wh, cfg, date=D2, model_dir=model_dir)

    def check(expected_notes: dict):
        """Each encounter row is the max over its notes' prediction rows; no row twice, none left over."""
        preds = predictions(wh)
        rows = encounters(wh)
        assert wh.table(wh.name(t.ENCOUNTER_PREDICTIONS)).count() == len(rows) == len(expected_notes)
        for encounter, ids in expected_notes.items():
            row = rows[(encounter, "bertxml-test-a")]
            stacked = np.array([preds[(n, "bertxml-test-a")].probabilities for n in ids])
            np.testing.assert_array_equal(np.array(row.probabilities, dtype=np.float32),
                                          stacked.max(axis=0).astype(np.float32))
            dates = [preds[(n, "bertxml-test-a")].note_date for n in ids]
            assert (row.n_notes, row.first_note_date, row.last_note_date) == (len(ids), min(dates), max(dates))
            assert row.predicted_codes == [c for c, p in zip(CODES, row.probabilities) if p >= 0.5 or c == "I10"]
            assert row.predicted_bands == ["auto" if c == "I10" else "review" for c in row.predicted_codes]
            assert [c.code for c in row.top_codes][0] == CODES[int(np.argmax(row.probabilities))]
        return rows

    rows = check({"EA": ["a1", "a2"], "EB": ["b1"], "EC": ["c1"]})
    assert rows[("EA", "bertxml-test-a")].patient_id == "P1"

    # A rerun of night 1 (as a catch-up would) leaves every encounter as one computation over the notes.
    run_score(wh, cfg, date=D1, model_dir=model_dir)
    check({"EA": ["a1", "a2"], "EB": ["b1"], "EC": ["c1"]})

    # Night 2 again after the feed changed: a2 deleted, c1 marked erroneous. EA falls back to a1 alone;
    # EC, left with no scored note, loses its row.
    write_notes(wh, notes[:2] + [enc("c1", D2, SENTENCES[3], "EC", status="erroneous")])
    run_score(wh, cfg, date=D2, model_dir=model_dir)
    check({"EA": ["a1"], "EB": ["b1"]})

    # The bands travel to the predictions, the view and model_labels.
    bands = {(r.note_id, r.code): r.band for r in wh.spark.sql(
        "SELECT note_id, code, band, encounter_id FROM bertxml.predicted_codes").collect()}
    assert bands[("a1", "I10")] == "auto" and {b for (n, c), b in bands.items() if c != "I10"} <= {"review"}
    labels = {r.code: r for r in wh.table(wh.name(t.MODEL_LABELS)).collect()}
    assert labels["I10"].auto_threshold == 0.0 and labels["I10"].dev_support == 40
    assert labels["E11.9"].auto_threshold is None
    assert predictions(wh)[("a1", "bertxml-test-a")].encounter_id == "EA"

    # The demo's example SQL over the new tables and columns runs and finds the rows.
    from bertxml.demo import EXAMPLE_SQL

    shown = [(title, wh.spark.sql(query).collect()) for title, query in EXAMPLE_SQL
             if any(word in title for word in ("band", "workload", "Operating points"))]
    assert len(shown) == 3 and all(rows for _, rows in shown)
    workload = {r.encounter_id: r for r in shown[1][1]}
    assert set(workload) == {"EA", "EB"} and workload["EA"].n_notes == 1
