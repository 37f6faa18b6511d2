"""Note text stays where it belongs: unique marker strings planted in note text must not come out of the
pipeline anywhere but the text tables.

Run: .venv/bin/python -m pytest -q tests/test_phi.py

A tiny generated warehouse gets markers planted in its notes (train, dev and test notes, the scored night,
a short note the ETL and the scorer reject, a second row of one note id with other text), then the commands
run as a user runs them, in a child process of their own so that everything they print is captured, Spark's
JVM and Python workers included: retrain (ETL, vocabulary, chunks, pretraining, fine-tuning, dev AUC),
score one night, evaluate it, explain one marked note without an opt-in to show text, and two commands that
fail (an explanation of an unknown code, a night with no notes). Then no marker may appear, in any case or
in the form the tokenizer normalises it to, in the child's output, any table row but the text tables'
(`ehr.notes`, `bertxml.labeled_notes`), any file of those other tables, the vocabulary folder, the model
folders or the reports.
"""
import json
import os
import random
import string
import subprocess
import sys
from pathlib import Path

from bertxml.platform import tables as t
from bertxml.platform.deltaread import read_delta

ROOT = Path(__file__).resolve().parent.parent

# Small enough to run in about a minute on 2 cores; big enough that every step has something to do.
TINY_CONF = """
spark: {master: "local[2]", driver_memory: "1g", shuffle_partitions: 2}
generate: {notes: 120, seed: 11, n_codes: 12, partitions: 2, long_note_rate: 0.0}
etl: {min_code_count: 1}
vocab: {size: 600, oov_notes: 20}
model: {hidden_size: 32, num_hidden_layers: 1, num_attention_heads: 2, intermediate_size: 64,
        max_position_embeddings: 128, max_len: 128, hidden_dropout_prob: 0.0, attention_probs_dropout_prob: 0.0}
pretrain: {max_steps: 2, batch_size: 8, max_len: 128, threads: 1, bf16: false, dev_batches: 1, log_every: 1}
train: {epochs: 1, max_steps: 3, batch_size: 8, threads: 1, bf16: false, log_every: 1, checkpoint_every: 0,
        eval_batch_size: 32}
score: {device: cpu, partitions: 1, num_threads: 1}
"""

# The child process: the user's commands, in order, one Spark application; a command that raises has its
# traceback printed (as under -v), so exception texts are captured too.
PIPELINE = r"""
import json, sys, traceback
from bertxml.cli import main

workdir, conf, night, note_id = sys.argv[1:5]
common = ["--workdir", workdir, "--conf", conf]
codes = {}
for name, argv in [("retrain", ["retrain"]), ("score", ["score", "--date", night]),
                   ("evaluate", ["evaluate", "--date", night]), ("explain", ["explain", note_id]),
                   ("explain-bad-code", ["explain", note_id, "--code", "NOPE.1"]),
                   ("score-no-notes", ["score", "--date", "1901-01-01"])]:
    try:
        codes[name] = main(argv[:1] + common + argv[1:])
    except BaseException:
        traceback.print_exc()
        codes[name] = "raised"
print("EXIT CODES " + json.dumps(codes))
"""


def marker(rng) -> str:
    """A letter string no note, code description or vocabulary holds by chance."""
    return "zqx" + "".join(rng.choice(string.ascii_lowercase) for _ in range(10))


def plant(text: str, core: str) -> str:
    """The marker three ways: a word, an identifier-shaped string, and upper case inside a sentence."""
    return f"{text}\nSeen with {core.capitalize()} today. Ref {core.upper()}48213. Called {core.upper()} back."


def plant_markers(wh, rng) -> tuple[list[str], str, str]:
    """Rewrite ehr.notes with markers; returns (marker cores, the scored night, the note to explain)."""
    notes = wh.table("ehr.notes")
    rows = [r.asDict() for r in notes.collect()]
    by_date: dict = {}                # notes no filter of the ETL drops, by date
    for r in rows:
        if r["text"] and len(r["text"]) >= 50 and r["status"] == "final" and r["author_role"] != "student" \
                and r["note_type"] != "miscellaneous":
            by_date.setdefault(r["note_date"], []).append(r)
    night = max(by_date, key=lambda d: (len(by_date[d]), d))
    cores, planted = [], []
    chosen = {id(r) for r in rng.sample([r for r in rows if r["text"] and len(r["text"]) >= 50], 30)}
    chosen |= {id(r) for r in by_date[night]}
    for r in rows:
        if id(r) in chosen:
            cores.append(marker(rng))
            r["text"] = plant(r["text"], cores[-1])
            planted.append(r)
    kept = [r for r in planted if any(r is k for k in by_date.get(r["note_date"], []))]
    explain = by_date[night][0]
    # A short note (rejected 'short_text' by the ETL and by the night's scoring) ...
    cores.append(marker(rng))
    rows.append({**explain, "note_id": "NSHORT", "text": f"Seen {cores[-1]} ok."})
    # ... and a second row of a note id with other text (both rejected 'conflicting_note_id').
    cores.append(marker(rng))
    twin = next(r for r in kept if r["note_date"] != night)
    rows.append({**twin, "text": plant(twin["text"], cores[-1]) + " amended"})
    df = wh.spark.createDataFrame([tuple(r[f.name] for f in t.NOTES_SCHEMA.fields) for r in rows], t.NOTES_SCHEMA)
    wh.write(df, "ehr.notes")
    return cores, str(night), explain["note_id"]


def forms(core: str) -> list[str]:
    """What to look for, lower case: the marker, and the tokenizer's normalised identifier-shaped form."""
    return [core, core + "nnnnn"]


def leaks(haystack: str, cores: list[str]) -> list[str]:
    low = haystack.lower()
    return [core for core in cores if any(form in low for form in forms(core))]


def file_leaks(root: Path, cores: list[str], skip: tuple[str, ...] = ()) -> dict[str, list[str]]:
    found = {}
    for path in sorted(root.rglob("*")) if root.exists() else []:
        if path.is_file() and not any(part in skip for part in path.parts):
            hit = leaks(path.read_bytes().decode("latin-1"), cores)
            if hit:
                found[str(path.relative_to(root))] = hit
    return found


def test_planted_markers_never_leave_the_text_tables(wh, cfg, tmp_path):
    from bertxml.etl.generate import run_generate

    conf = tmp_path / "tiny.yaml"
    conf.write_text(TINY_CONF)
    from bertxml.config_io import load_config

    tiny = load_config([str(conf)])
    run_generate(wh, tiny.generate)
    cores, night, explain_id = plant_markers(wh, random.Random(5))
    assert len(cores) >= 32

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    child = subprocess.run([sys.executable, "-c", PIPELINE, str(wh.workdir), str(conf), night, explain_id],
                           capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
    output = child.stdout + child.stderr
    exit_line = [line for line in child.stdout.splitlines() if line.startswith("EXIT CODES ")]
    assert exit_line, output[-3000:]
    codes = json.loads(exit_line[-1][len("EXIT CODES "):])
    assert codes == {"retrain": 0, "score": 0, "evaluate": 0, "explain": 0, "explain-bad-code": 1,
                     "score-no-notes": 1}, output[-3000:]
    # The failures were logged with their cause, and the pipeline said what it did (so the scan below
    # reads real output, not an empty string).
    assert "NOPE.1" in output and "NoNotesError" in output and "retrain done" in output

    assert leaks(output, cores) == [], "a marker in the commands' output"

    # Every table but the text tables, row by row (job_runs, rejects, predictions, reports, chunks ...): each
    # Delta folder under tables/, read with the JVM-free reader (every table the jobs wrote, registered or not).
    tables = wh.workdir / "tables"
    text_tables = {"ehr.notes", wh.name(t.LABELED_NOTES)}
    contents, scanned = {}, {}
    for folder in sorted(tables.glob("*/*")):
        name = f"{folder.parent.name}.{folder.name}"
        contents[name] = read_delta(folder).to_pylist()
        if name in text_tables:
            continue
        scanned[name] = len(contents[name])
        assert leaks("\n".join(json.dumps(r, default=str) for r in contents[name]), cores) == [], f"a marker in {name}"
    assert scanned[wh.name(t.JOB_RUNS)] >= 10 and scanned[wh.name(t.PREDICTIONS)] > 0
    reasons = {(r["job"], r["reason"]) for r in contents[wh.name(t.REJECTS)]
               if r["note_id"] == "NSHORT" or r["reason"] == "conflicting_note_id"}
    assert {("etl", "short_text"), ("etl", "conflicting_note_id"), ("score", "short_text")} <= reasons
    assert sum(r["status"].startswith("failed") for r in contents[wh.name(t.JOB_RUNS)]) == 2

    # The markers are in the text tables (the scan looks in the right place) ...
    labeled = "\n".join(r["text"] for r in contents[wh.name(t.LABELED_NOTES)])
    assert len(leaks(labeled, cores)) >= 20

    # ... and in no file of the other tables, the vocabulary, the models or the reports.
    assert file_leaks(tables, cores, skip=("notes", t.LABELED_NOTES)) == {}
    for folder in ("vocab", "models", "reports", "mlflow"):  # mlflow: the tracking store and its artifacts
        assert (wh.workdir / folder).exists(), folder
        assert file_leaks(wh.workdir / folder, cores) == {}, folder
    model_files = {p.name for p in (wh.workdir / "models").rglob("*") if p.is_file()}
    assert {"tokenizer.json", "manifest.json", "label_vocab.json", "model.safetensors"} <= model_files
    vocab = json.loads((wh.workdir / "vocab" / "tokenizer.json").read_text())["model"]["vocab"]
    assert len(vocab) > 100


def test_shuffle_and_disk_blocks_are_encrypted(spark):
    """Text Spark writes to local disk (shuffle files, disk-persisted blocks) is unreadable there: the
    embedded default runs with spark.io.encryption.enabled."""
    from pyspark import StorageLevel

    assert spark.conf.get("spark.io.encryption.enabled") == "true"
    core = marker(random.Random(17))
    rows = [(i, f"note {i}: seen with {core.upper()} about {''.join(random.Random(i).choices('abcdef', k=40))}")
            for i in range(400)]
    df = spark.createDataFrame(rows, "id int, text string")
    assert df.repartition(3, "id").count() == 400                  # a shuffle: map outputs on disk
    kept = df.repartition(2).persist(StorageLevel.DISK_ONLY)
    assert kept.count() == 400                                      # blocks on disk
    dirs = spark._jvm.org.apache.spark.SparkEnv.get().blockManager().diskBlockManager().localDirs()
    files = [p for d in dirs for p in Path(d.getAbsolutePath()).rglob("*") if p.is_file()]
    assert any(p.name.startswith("shuffle_") and p.name.endswith(".data") for p in files)
    assert any(p.name.startswith("rdd_") for p in files)
    found = [p.name for p in files if leaks(p.read_bytes().decode("latin-1"), [core])]
    kept.unpersist()
    assert found == []
