"""Tests for bertxml/reports/explain.py: attention spans of a tiny BERT-XML model, the HTML rendering, and that the
note text (PHI) never reaches a table.

Run: .venv/bin/python -m pytest -q tests/test_explain.py
"""
import datetime as dt
import stat

import pytest

from bertxml.platform import tables as t
from bertxml.reports.explain import PHI_WARNING, explain_text, format_explanation, run_explain
from bertxml.scoring.predictors import make_predict_fn
from test_score import CODES, SENTENCES, make_model_dir

TEXT = SENTENCES[0] + "\n" + SENTENCES[5] + "\n" + SENTENCES[6] + " <b>&</b>"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # I10 always predicted, the others never: the explanation covers exactly one code.
    return make_model_dir(tmp_path_factory.mktemp("models"), thresholds={c: (0.0 if c == "I10" else 1.1)
                                                                         for c in CODES})


def test_explain_text_tokens_spans_and_probabilities(model_dir):
    scorer = make_predict_fn(model_dir, device="cpu", cpu_bf16=False)  # fp32: compared with the scorer to 1e-5
    result = explain_text(scorer, TEXT, top_k=5)
    assert [c["code"] for c in result["codes"]] == ["I10"] and result["n_chunks"] > 1   # max_len 16: chunks
    c = result["codes"][0]
    assert c["probability"] == pytest.approx(float(scorer([TEXT])[0][CODES.index("I10")]), abs=1e-5)
    assert c["predicted"] and 0 <= c["chunk_index"] < result["n_chunks"]
    weights = [x["weight"] for x in c["top_tokens"]]
    assert len(weights) == 5 and weights == sorted(weights, reverse=True)
    assert sum(c["_weights"].values()) + c["special_share"] == pytest.approx(1.0, abs=1e-5)   # eq. 2: sums to 1
    for x in c["top_tokens"] + c["spans"]:
        assert TEXT[x["start"]:x["end"]] == x["text"] and x["text"].strip()
    assert c["spans"][0]["weight"] >= c["spans"][-1]["weight"]
    # Asked for one code, it is explained whether predicted or not.
    asked = explain_text(scorer, TEXT, code="E11.9")["codes"]
    assert [a["code"] for a in asked] == ["E11.9"] and not asked[0]["predicted"]
    with pytest.raises(ValueError, match="label vocabulary"):
        explain_text(scorer, TEXT, code="Z00.00")


def test_cls_model_cannot_be_explained(tmp_path):
    scorer = make_predict_fn(make_model_dir(tmp_path, "cls-x", head="cls"), device="cpu")
    with pytest.raises(ValueError, match="label attention"):
        explain_text(scorer, TEXT)


def test_run_explain_writes_html_and_no_text_to_tables(wh, cfg, model_dir, tmp_path, capsys):
    notes = [("n1", "P1", "E1", dt.date(2025, 3, 1), "progress_note", "physician", "final", TEXT)]
    wh.write(wh.spark.createDataFrame(notes, t.NOTES_SCHEMA), "ehr.notes")
    html_path = tmp_path / "out" / "n1.html"
    result = run_explain(wh, cfg, "n1", model_dir=model_dir, html_path=html_path, top_k=5)

    assert PHI_WARNING in capsys.readouterr().err
    assert result["note_id"] == "n1" and result["codes"][0]["code"] == "I10" and "_offsets" not in result
    page = html_path.read_text()
    assert stat.S_IMODE(html_path.stat().st_mode) == 0o600
    # Note text is escaped token by token: no raw markup from the note survives into the page.
    assert "background: rgba(200, 30, 30," in page and "&lt;" in page and "&amp;" in page and "<b>" not in page
    assert "I10" in page and "hypertension" in page
    printed = format_explanation(result)
    assert "I10" in printed and "spans:" in printed

    # No table holds any of the note's text: scan every string value of every table in the warehouse.
    ours = [p.parent.name for p in (wh.workdir / "tables" / cfg.warehouse.schema).glob("*/_delta_log")]
    assert "job_runs" in ours
    for table in ours:
        df = wh.table(f"{cfg.warehouse.schema}.{table}")
        values = " ".join(str(v) for row in df.collect() for v in row)
        for fragment in ("hypertension", "labral", "lisinopril", "blood pressure"):
            assert fragment not in values.lower(), (table, fragment)
    with pytest.raises(LookupError, match="nope"):
        run_explain(wh, cfg, "nope", model_dir=model_dir)


def test_run_explain_renders_the_scoring_evidence(wh, cfg, model_dir, tmp_path, capsys):
    """With bertxml.evidence rows for the note and model version (the engine's own, written as the nightly
    job writes them) explain renders those, loads no model, and still reads the text only as the opt-in."""
    from bertxml.scoring.predictors import read_model_info

    info = read_model_info(model_dir)
    scored = make_predict_fn(model_dir, device="cpu", cpu_bf16=False, evidence_top_k=2).score([TEXT])
    spans = scored.evidence[0]
    assert [s["code"] for s in spans] == ["I10", "I10"]
    night = dt.date(2025, 3, 1)
    wh.write(wh.spark.createDataFrame(
        [("n1", "P1", "E1", night, "progress_note", "physician", "final", TEXT)], t.NOTES_SCHEMA), "ehr.notes")
    wh.write(wh.spark.createDataFrame(info.label_rows(), t.MODEL_LABELS_SCHEMA), wh.name(t.MODEL_LABELS))
    wh.write(wh.spark.createDataFrame(
        [("n1", "P1", night, info.model_version, "run-1", dt.datetime(2025, 3, 2), scored.probs[0].tolist(), None,
          ["I10"], int(scored.n_chunks[0]), False, "E1", ["review"])], t.PREDICTIONS_SCHEMA), wh.name(t.PREDICTIONS))
    wh.write(wh.spark.createDataFrame(
        [("n1", night, info.model_version, s["code"], s["rank"], s["char_start"], s["char_end"], s["weight"], "run-1")
         for s in spans], t.EVIDENCE_SCHEMA), wh.name(t.EVIDENCE))

    html_path = tmp_path / "n1.html"
    result = run_explain(wh, cfg, "n1", model_dir=model_dir, html_path=html_path)
    assert PHI_WARNING in capsys.readouterr().err
    assert result["source"] == "evidence" and [c["code"] for c in result["codes"]] == ["I10"]
    c = result["codes"][0]
    assert c["probability"] == pytest.approx(float(scored.probs[0][CODES.index("I10")]))
    assert [(x["start"], x["end"], x["text"]) for x in c["spans"]] == [
        (s["char_start"], s["char_end"], TEXT[s["char_start"]:s["char_end"]]) for s in spans]
    assert "scoring run run-1" in html_path.read_text() and "spans:" in format_explanation(result)
    # A code the scoring run has no evidence for is recomputed with the model.
    assert run_explain(wh, cfg, "n1", code="E11.9", model_dir=model_dir)["source"] == "model"
