"""Tests for notebooks/analysts.ipynb: it is stored without outputs, and it runs headless (nbclient) against a
tiny warehouse with two scored nights and their AUC reports, drawing its figures and showing no note text.

Run: .venv/bin/python -m pytest -q tests/test_notebook.py

The notebook's kernel is a separate process that starts its own local Spark over the same warehouse folder
(the path-mode catalog is per process), so it never shares or stops the tests' session.
"""
import datetime as dt
import os
import sys
from pathlib import Path

import nbformat
import numpy as np
import pytest

from bertxml.platform import tables as t
from bertxml.scoring.score import run_score
from bertxml.platform.views import create_views
from test_evaluate import D1, D2, NOTES
from test_score import CODES, make_model_dir

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "analysts.ipynb"
# Words of the test notes (test_score.SENTENCES): none may reach an output while SHOW_TEXT is False.
NOTE_WORDS = ("hypertension", "metformin", "wheezing", "lifting", "labral", "lisinopril", "hemoglobin")
# The kernel's Spark: small, one core, so it fits beside the tests' session on a shared machine.
KERNEL_CONF = """
spark: {master: "local[1]", driver_memory: "1g", shuffle_partitions: 2}
score: {device: cpu, partitions: 1}
"""


def tagged(nb, tag):
    cells = [c for c in nb.cells if tag in c.metadata.get("tags", [])]
    assert len(cells) == 1, f"one cell tagged {tag!r} expected, found {len(cells)}"
    return cells[0]


def text_of(cell) -> str:
    """Everything a cell showed: streams, errors and the text/plain and text/html of its displays."""
    parts = []
    for out in cell.get("outputs", []):
        parts.append(out.get("text", ""))
        parts.extend(out.get("data", {}).get(kind, "") for kind in ("text/plain", "text/html"))
        parts.extend(out.get("traceback", []))
    return "\n".join(parts)


def test_notebook_is_stored_without_outputs_and_text_off():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)
    params = tagged(nb, "parameters").source
    assert "SHOW_TEXT = False" in params and "BERTXML_WORKDIR" in params
    assert nb.metadata.kernelspec.name == "python3"


def write_evaluations(wh, model_version):
    """bertxml.auc_report and bertxml.code_auc as `bertxml evaluate --from D1 --to D2` and `--split test`
    write them (that job is tested in test_evaluate.py; running it here would double this test's time)."""
    run, split_run = "evaluate-nights", "evaluate-test"
    at, later = dt.datetime(2025, 3, 9, 3, 0), dt.datetime(2025, 3, 9, 4, 0)
    nights = f"dates:{D1}..{D2}"
    reports = [(run, model_version, nights, 0.81, 0.78, 0.7, 5, 0, 1, 6, 0.5, 0.4, 0.3, 0.2, at),
               (run, model_version, f"date:{D1}", 0.84, 0.80, 0.7, 4, 1, 1, 3, 0.5, 0.4, 0.3, 0.2, at),
               (run, model_version, f"date:{D2}", 0.77, 0.74, None, 4, 1, 0, 3, 0.5, 0.4, 0.3, 0.2, at),
               (split_run, model_version, "test", 0.9, 0.88, 0.8, 5, 0, 1, 40, 0.6, 0.5, 0.3, 0.2, later)]
    aucs = {"E11.9": 0.91, "I10": 0.62, "J45.909": 0.85, "M54.5": None, "R05.9": 0.97}
    code_auc = [(r, model_version, ds, code, f"description of {code}", auc, 0 if auc is None else 2, 1000)
                for r, ds in ((run, nights), (split_run, "test")) for code, auc in aucs.items()]
    wh.write(wh.spark.createDataFrame(reports, t.AUC_REPORT_SCHEMA), wh.name(t.AUC_REPORT))
    wh.write(wh.spark.createDataFrame(code_auc, t.CODE_AUC_SCHEMA), wh.name(t.CODE_AUC))


def write_drift_profile(model_dir, texts):
    """drift_profile.json as training records it (`bertxml.models.profile.training_profile`), here from the nights'
    own texts with every code at a dev rate of 1/2, so bertxml.night_drift gets rows to plot."""
    from tokenizers import Tokenizer

    from bertxml.models.profile import PROFILE_VERSION, bin_counts, length_edges, word_stats
    from bertxml.models.modeldir import DRIFT_PROFILE_FILE, write_json

    words, oov = word_stats(Tokenizer.from_file(str(model_dir / "tokenizer.json")), texts)
    edges = length_edges(words, 3)
    write_json(model_dir / DRIFT_PROFILE_FILE, {
        "profile_version": PROFILE_VERSION, "train_notes": len(texts), "measured_notes": len(texts),
        "note_length": {"unit": "words", "edges": edges, "counts": bin_counts(words, edges).tolist(),
                        "median": float(np.median(words)), "mean": float(words.mean())},
        "oov": {"words": int(words.sum()), "oov_words": int(oov.sum()), "share": float(oov.sum() / words.sum())},
        "note_types": {"progress_note": len(texts)}, "note_types_reason": None,
        "codes": {c: {"train_rate": 0.2, "rate": 0.5, "mean_probability": 0.5} for c in CODES},
        "dev": {"notes": len(texts), "codes_per_note": 2.5}})


@pytest.fixture
def scored_warehouse(wh, cfg):
    """Two nights of notes scored by a tiny model under WORKDIR/models, and their AUC reports."""
    notes = [(i, p, e, d, "progress_note", "physician", "final", text) for i, p, e, d, text, _ in NOTES]
    wh.write(wh.spark.createDataFrame(notes, t.NOTES_SCHEMA), "ehr.notes")
    # I10 is predicted for every note (threshold 0), so each night has codes and the explanation a code.
    model_dir = make_model_dir(wh.workdir / "models", thresholds={c: 0.0 if c == "I10" else 0.5 for c in CODES})
    write_drift_profile(model_dir, [n[4] for n in NOTES])
    cfg.score.partitions = 1
    assert run_score(wh, cfg, since_last=True, model_dir=model_dir)["notes_scored"] == len(NOTES)
    write_evaluations(wh, "bertxml-test-a")
    create_views(wh)          # latest_auc, over the report just written
    return wh


def test_notebook_runs_headless_against_a_small_warehouse(scored_warehouse, tmp_path):
    from jupyter_client.kernelspec import KernelSpecManager
    from nbclient import NotebookClient

    # The notebook names the kernel "python3"; jupyter_client runs a spec whose argv starts with "python"
    # with this very interpreter (the venv's), so the kernel imports the same bertxml.
    argv0 = KernelSpecManager().get_kernel_spec("python3").argv[0]
    assert argv0 in ("python", "python3", sys.executable), f"the python3 kernel runs {argv0}, not the venv"

    wh = scored_warehouse
    conf = tmp_path / "kernel.yaml"
    conf.write_text(KERNEL_CONF)
    env = {**os.environ, "BERTXML_WORKDIR": str(wh.workdir), "BERTXML_CONF": str(conf),
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    for name in ("BERTXML_MODEL_VERSION", "BERTXML_DATASET", "BERTXML_NOTE_ID"):
        env.pop(name, None)       # the notebook's own choices
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(nb, kernel_name="python3", timeout=300, startup_timeout=120,
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute(env=env)

    per_night = text_of(tagged(nb, "codes-per-night"))
    assert D1.isoformat() in per_night and D2.isoformat() in per_night       # one row per scored night
    assert "I10" in text_of(tagged(nb, "top-codes"))
    assert D2.isoformat() in text_of(tagged(nb, "auc-over-time"))           # the nightly AUC table
    drift = text_of(tagged(nb, "drift-over-time"))                           # bertxml.night_drift's nights
    assert D1.isoformat() in drift and D2.isoformat() in drift and "n_notes" in drift
    code_auc = text_of(tagged(nb, "code-auc"))
    assert "evaluate-test on test: 4 codes with an AUC" in code_auc                # the newest evaluation
    assert code_auc.index("I10") < code_auc.index("J45.909") < code_auc.index("E11.9")  # worst first
    explanation = text_of(tagged(nb, "explanation"))
    assert "I10" in explanation and "weight" in explanation and "char_start" in explanation
    assert "bertxml.evidence" in explanation and "text was not read" in explanation   # the scoring job's rows
    assert "SHOW_TEXT is False" in text_of(tagged(nb, "explanation-text"))
    for tag in ("codes-per-night", "auc-over-time", "drift-over-time", "code-auc"):
        images = [o for o in tagged(nb, tag).outputs if "image/png" in o.get("data", {})]
        assert len(images) == 1, tag
    everything = "\n".join(text_of(c) for c in nb.cells if c.cell_type == "code").lower()
    for word in NOTE_WORDS:
        assert word not in everything, f"note text ({word!r}) in the notebook's output"
    # Shown from bertxml.evidence without reading the note: no explain run (the text is read, and the run
    # recorded, only with SHOW_TEXT = True or for a note without evidence rows).
    assert wh.table(wh.name(t.JOB_RUNS)).filter("job = 'explain'").count() == 0
