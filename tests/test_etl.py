"""The ETL's rules, each pinned on a tiny hand-built table (paper §4.1)."""
import datetime as dt
import json
import random

import pytest
from pyspark.sql import functions as F

from bertxml.platform import tables as t
from bertxml.config import EtlConfig
from bertxml.etl.etl import ReplayError, assign_split, build_label_vocab, label_notes, run_etl, split_of
from bertxml.platform.runs import job_run
from bertxml.etl.icd import icd_reference, label_texts, normalize_code
from bertxml.platform.warehouse import SchemaError

TEXT = "Patient seen today for follow up of chronic conditions; stable on current regimen."
D = dt.date


def note(note_id, patient="P1", encounter="E1", date=D(2024, 1, 1), text=TEXT, note_type="progress_note",
         author="physician", status="final"):
    return (note_id, patient, encounter, date, note_type, author, status, text)


@pytest.fixture(scope="module")
def reference(spark):
    return icd_reference(spark)


def run(spark, reference, notes, diagnoses, cfg=None):
    n = spark.createDataFrame(notes, t.NOTES_SCHEMA)
    d = spark.createDataFrame(diagnoses, t.DIAGNOSES_SCHEMA)
    labeled, rejects, notes_read = label_notes(n, d, reference, cfg or EtlConfig())
    rows, rejected = labeled.collect(), rejects.collect()
    by_id = {r.note_id: r for r in rows}
    # Every note row read is labeled or rejected, exactly once (the job's row-count check relies on it).
    assert notes_read == len(notes) == len(rows) + sum(r.source == "notes" for r in rejected)
    assert len(by_id) == len(rows)
    return (by_id,
            sorted(((r.source, r.note_id or r.icd10_code, r.reason) for r in rejected), key=_key))


def _key(row):
    return tuple("" if v is None else v for v in row)


def test_filters_drop_each_category(spark, reference):
    notes = [note("keep"), note("err", status="erroneous"), note("stu", author="student"),
             note("misc", note_type="miscellaneous"), note("short", text="too short"),
             note("case", status=" Erroneous ")]
    labeled, rejects = run(spark, reference, notes, [("P1", "E1", "I10", D(2024, 1, 1))])
    assert set(labeled) == {"keep"}
    assert rejects == [("notes", "case", "dropped_status"), ("notes", "err", "dropped_status"),
                       ("notes", "misc", "dropped_note_type"), ("notes", "short", "short_text"),
                       ("notes", "stu", "dropped_author_role")]


def test_filter_lists_and_length_are_configurable(spark, reference):
    cfg = EtlConfig(drop_statuses=[], min_text_chars=5)
    labeled, _ = run(spark, reference, [note("err", status="erroneous"), note("short", text="too short")],
                     [("P1", "E1", "I10", D(2024, 1, 1))], cfg)
    assert set(labeled) == {"err", "short"}


def test_note_codes_are_its_encounter_codes(spark, reference):
    notes = [note("a", encounter="E1"), note("b", encounter="E1"), note("c", encounter="E2")]
    diag = [("P1", "E1", "J06.9", D(2024, 1, 1)), ("P1", "E1", "R05.9", D(2024, 1, 1)),
            ("P1", "E2", "S93.401A", D(2024, 1, 1))]
    labeled, _ = run(spark, reference, notes, diag)
    assert labeled["a"].codes == labeled["b"].codes == ["J06.9", "R05.9"]
    assert labeled["c"].codes == ["S93.401A"]


def test_chronic_code_imputed_from_earliest_date_on_not_before(spark, reference):
    # I10 (chronic) on encounters E2 (Feb) and E3 (Apr): imputed on notes from Feb on, never in January.
    notes = [note("jan", encounter="E1", date=D(2024, 1, 10)), note("feb", encounter="E2", date=D(2024, 2, 1)),
             note("mar", encounter="E4", date=D(2024, 3, 1)), note("apr", encounter="E3", date=D(2024, 4, 1))]
    diag = [("P1", "E1", "J06.9", D(2024, 1, 10)), ("P1", "E2", "I10", D(2024, 2, 1)),
            ("P1", "E3", "I10", D(2024, 4, 1)), ("P1", "E4", "S93.401A", D(2024, 3, 1))]
    labeled, _ = run(spark, reference, notes, diag)
    assert labeled["jan"].imputed_codes == [] and "I10" not in labeled["jan"].codes
    assert labeled["feb"].imputed_codes == []          # already an encounter code there
    assert labeled["mar"].imputed_codes == ["I10"] and labeled["mar"].codes == ["I10", "S93.401A"]
    assert labeled["apr"].imputed_codes == []


def test_chronic_code_on_one_encounter_is_not_imputed(spark, reference):
    notes = [note("a", encounter="E1", date=D(2024, 1, 1)), note("b", encounter="E2", date=D(2024, 2, 1))]
    diag = [("P1", "E1", "I10", D(2024, 1, 1)), ("P1", "E2", "J06.9", D(2024, 2, 1))]
    labeled, _ = run(spark, reference, notes, diag)
    assert labeled["b"].imputed_codes == [] and labeled["b"].codes == ["J06.9"]


def test_threshold_counts_encounters_not_rows(spark, reference):
    # The same chronic code twice within one encounter is still one encounter.
    notes = [note("a", encounter="E1", date=D(2024, 1, 1)), note("b", encounter="E2", date=D(2024, 2, 1))]
    diag = [("P1", "E1", "I10", D(2024, 1, 1)), ("P1", "E1", "i10", D(2024, 1, 1)),
            ("P1", "E2", "J06.9", D(2024, 2, 1))]
    labeled, _ = run(spark, reference, notes, diag)
    assert labeled["b"].imputed_codes == []


def test_non_chronic_code_never_imputed(spark, reference):
    # J06.9 (acute URI) on two encounters is not chronic in the AHRQ CCI.
    notes = [note("a", encounter="E1", date=D(2024, 1, 1)), note("b", encounter="E2", date=D(2024, 2, 1)),
             note("c", encounter="E3", date=D(2024, 3, 1))]
    diag = [("P1", "E1", "J06.9", D(2024, 1, 1)), ("P1", "E2", "J06.9", D(2024, 2, 1)),
            ("P1", "E3", "S93.401A", D(2024, 3, 1))]
    labeled, _ = run(spark, reference, notes, diag)
    assert labeled["c"].imputed_codes == [] and labeled["c"].codes == ["S93.401A"]


def test_imputation_never_crosses_patients(spark, reference):
    notes = [note("p2", patient="P2", encounter="E9", date=D(2024, 5, 1))]
    diag = [("P1", "E1", "I10", D(2024, 1, 1)), ("P1", "E2", "I10", D(2024, 2, 1)),
            ("P2", "E9", "J06.9", D(2024, 5, 1))]
    labeled, _ = run(spark, reference, notes, diag)
    assert labeled["p2"].codes == ["J06.9"]


def test_code_normalisation(spark, reference):
    assert [normalize_code(c) for c in (" e119 ", "E11.9", "e11 .9", "i10", "T814XXA")] == \
        ["E11.9", "E11.9", "E11.9", "I10", "T81.4XXA"]
    notes = [note("a")]
    diag = [("P1", "E1", " e119 ", D(2024, 1, 1)), ("P1", "E1", "E11.9", D(2024, 1, 1)),
            ("P1", "E1", "i10", D(2024, 1, 1))]
    labeled, rejects = run(spark, reference, notes, diag)
    assert labeled["a"].codes == ["E11.9", "I10"] and rejects == []


def test_every_reject_reason(spark, reference):
    notes = [note(None), note("nopat", patient=None), note("noenc", encounter=None),
             note("nodate", date=None), note("empty", text="   "), note("nulltext", text=None),
             note("dup"), note("dup"), note("conf"), note("conf", text=TEXT + " amended"),
             note("nodx", encounter="E404"), note("ok"),
             note("redo"), note("redo", status="erroneous", text=TEXT + " draft")]  # one copy filtered out
    diag = [("P1", "E1", "I10", D(2024, 1, 1)), ("P1", "E1", "E11..9X!", D(2024, 1, 1)),
            ("P1", "E1", "Z99.999", D(2024, 1, 1)), ("P1", None, "I10", D(2024, 1, 1)),
            (None, "E1", "I10", D(2024, 1, 1)), ("P1", "E1", "I10", None), ("P1", "E1", None, D(2024, 1, 1))]
    labeled, rejects = run(spark, reference, notes, diag)
    assert set(labeled) == {"dup", "ok", "redo"}
    assert labeled["dup"].text == labeled["redo"].text == TEXT  # repeated ids keep their text
    assert rejects == sorted([
        ("notes", "redo", "dropped_status"),
        ("notes", None, "null_note_id"), ("notes", "nopat", "null_patient_id"),
        ("notes", "noenc", "null_encounter_id"), ("notes", "nodate", "null_note_date"),
        ("notes", "empty", "empty_text"), ("notes", "nulltext", "empty_text"),
        ("notes", "dup", "duplicate_row"), ("notes", "conf", "conflicting_note_id"),
        ("notes", "conf", "conflicting_note_id"), ("notes", "nodx", "no_diagnoses"),
        ("diagnoses", "E11..9X!", "malformed_code"), ("diagnoses", "Z99.999", "unknown_code"),
        ("diagnoses", "I10", "null_encounter_id"), ("diagnoses", "I10", "null_patient_id"),
        ("diagnoses", "I10", "null_diagnosis_date"), ("diagnoses", None, "malformed_code")], key=_key)


def test_rejects_never_hold_note_text(spark, reference):
    n = spark.createDataFrame([note("short", text="secret words")], t.NOTES_SCHEMA)
    d = spark.createDataFrame([("P1", "E1", "I10", D(2024, 1, 1))], t.DIAGNOSES_SCHEMA)
    rejects = label_notes(n, d, reference, EtlConfig()).rejects
    row = rejects.collect()[0]
    assert "secret" not in json.dumps(row.asDict(), default=str)
    assert json.loads(row.record)["text_bytes"] == len("secret words")


def test_split_is_deterministic_stable_and_patient_disjoint(spark):
    patients = [f"P{i:05d}" for i in range(3000)]
    df = spark.createDataFrame([(p,) for p in patients], "patient_id STRING")
    first = {r.patient_id: r.split for r in df.select("patient_id", assign_split(F.col("patient_id"), "s")
                                                     .alias("split")).collect()}
    # Rows added later never move existing patients; the Python twin agrees with Spark.
    grown = spark.createDataFrame([(p,) for p in patients + [f"Q{i}" for i in range(500)]], "patient_id STRING")
    second = {r.patient_id: r.split for r in grown.select("patient_id", assign_split(F.col("patient_id"), "s")
                                                         .alias("split")).collect()}
    assert all(second[p] == s for p, s in first.items())
    assert all(split_of(p, "s") == s for p, s in first.items())
    shares = {s: list(first.values()).count(s) / len(first) for s in ("train", "dev", "test")}
    assert abs(shares["train"] - 0.7) < 0.03 and abs(shares["dev"] - 0.1) < 0.02
    other = {r.patient_id: r.split for r in df.select("patient_id", assign_split(F.col("patient_id"), "t")
                                                     .alias("split")).collect()}
    assert other != first  # the salt draws a different split


def test_notes_of_one_patient_share_a_split(spark, reference):
    notes = [note(f"n{i}", patient=f"P{i % 7}", encounter=f"E{i}") for i in range(60)]
    diag = [(f"P{i % 7}", f"E{i}", "I10", D(2024, 1, 1)) for i in range(60)]
    labeled, _ = run(spark, reference, notes, diag)
    by_patient = {}
    for r in labeled.values():
        by_patient.setdefault(r.patient_id, set()).add(r.split)
    assert all(len(s) == 1 for s in by_patient.values())


def test_label_threshold_is_strictly_more_than(spark, reference):
    rows = [("train", ["I10", "E11.9"])] * 3 + [("train", ["I10"])] + [("dev", ["J06.9"])] * 9
    df = spark.createDataFrame(rows, "split STRING, codes ARRAY<STRING>")
    vocab = build_label_vocab(df, reference, min_code_count=3).collect()
    assert [(r.label_index, r.code, r.train_count, r.is_chronic) for r in vocab] == [(0, "I10", 4, True)]
    assert vocab[0].description == "Essential (primary) hypertension"


def test_schema_problem_stops_before_writing(wh, spark):
    bad = spark.createDataFrame([("n1", "P1")], "note_id STRING, patient_id STRING")
    good_diag = spark.createDataFrame([("P1", "E1", "I10", D(2024, 1, 1))], t.DIAGNOSES_SCHEMA)
    wh.write(bad, "ehr.notes")
    wh.write(good_diag, "ehr.diagnoses")
    with pytest.raises(SchemaError, match="missing column 'encounter_id'"):
        run_etl(wh, wh.cfg)
    assert not wh.exists(wh.name(t.LABELED_NOTES)) and not wh.exists(wh.name(t.REJECTS))
    typed = spark.createDataFrame([("P1", "E1", "I10", "2024-01-01")],
                                  "patient_id STRING, encounter_id STRING, icd10_code STRING, diagnosis_date STRING")
    wh.write(typed, "ehr.diagnoses")
    wh.write(spark.createDataFrame([note("a")], t.NOTES_SCHEMA), "ehr.notes")
    with pytest.raises(SchemaError, match="'diagnosis_date' is string, expected date"):
        run_etl(wh, wh.cfg)
    assert not wh.exists(wh.name(t.LABELED_NOTES))


def test_rerun_writes_same_tables_and_reads_snapshots(wh, spark):
    wh.cfg.etl.min_code_count = 0
    wh.write(spark.createDataFrame([note("a"), note("b", status="erroneous")], t.NOTES_SCHEMA), "ehr.notes")
    wh.write(spark.createDataFrame([("P1", "E1", "I10", D(2024, 1, 1))], t.DIAGNOSES_SCHEMA), "ehr.diagnoses")
    first = run_etl(wh, wh.cfg)
    run_etl(wh, wh.cfg)
    assert wh.table("bertxml.labeled_notes").count() == first["labeled_notes"] == 1
    assert wh.rows_written("bertxml.labeled_notes", first["outputs"]["bertxml.labeled_notes"]) == 1
    assert wh.table("bertxml.rejects").count() == 1  # rerun replaces, never duplicates
    wh.write(spark.createDataFrame([note("c")], t.NOTES_SCHEMA), "ehr.notes", mode="append")
    assert run_etl(wh, wh.cfg)["labeled_notes"] == 2
    snap = run_etl(wh, wh.cfg, as_of_run=first["run_id"])
    assert snap["labeled_notes"] == 1
    history = wh.spark.sql("SELECT inputs, status FROM bertxml.job_runs WHERE job = 'etl'").collect()
    assert len(history) == 4 and all(r.status == "succeeded" for r in history)
    assert sorted(json.loads(r.inputs)["notes"]["version"] for r in history) == [0, 0, 0, 1]


def test_rejects_are_partitioned_by_job_and_an_unpartitioned_table_still_works(wh, spark):
    wh.write(spark.createDataFrame([note("a"), note("b", status="erroneous")], t.NOTES_SCHEMA), "ehr.notes")
    wh.write(spark.createDataFrame([("P1", "E1", "I10", D(2024, 1, 1))], t.DIAGNOSES_SCHEMA), "ehr.diagnoses")
    layout = lambda: spark.sql("DESCRIBE DETAIL bertxml.rejects").first().partitionColumns  # noqa: E731
    run_etl(wh, wh.cfg)
    assert layout() == ["job"]
    # A table laid out without partitions (as an earlier bertxml did): replaced in place, the night's row kept.
    night = ("score", "notes", "n9", "P9", "E9", None, "empty_text", "{}", "2024-01-02", "r0", dt.datetime(2024, 1, 2))
    wh.write(spark.createDataFrame([night], t.REJECTS_SCHEMA), "bertxml.rejects")
    assert layout() == []
    run_etl(wh, wh.cfg)
    run_etl(wh, wh.cfg)
    jobs = wh.table("bertxml.rejects").groupBy("job").count().collect()
    assert sorted(map(tuple, jobs)) == [("etl", 1), ("score", 1)] and layout() == []


def test_preload_loads_a_tables_delta_state_ahead_of_its_overwrite(wh, spark):
    sc, table = spark.sparkContext, "bench.small"

    def overwrite_jobs(group: str) -> int:
        sc.setLocalProperty("spark.jobGroup.id", group)  # only the group: nothing left on later jobs
        try:
            wh.write(spark.range(3), table)
        finally:
            sc.setLocalProperty("spark.jobGroup.id", None)
        return len(sc.statusTracker().getJobIdsForGroup(group))

    wh.write(spark.range(3), table)
    cold = overwrite_jobs("cold")  # loads the state of the version before it itself
    with wh.preloaded([table, "bench.missing"]):  # a missing table is skipped
        pass
    warm = overwrite_jobs("warm")
    assert warm < cold and wh.table(table).count() == 3


def test_short_text_counts_characters_after_trimming_spaces(spark, reference):
    notes = [note("padded", text=" " * 5000 + "x" * 49 + " " * 5000),  # long, but 49 characters once trimmed
             note("accented", text="é" * 49),                           # 98 bytes, 49 characters
             note("blank", text=" " * 3000),
             note("tab", text="\t" + "y" * 49),                         # trim removes spaces only: 50 characters
             note("keep", text="x" * 50)]
    labeled, rejects = run(spark, reference, notes, [("P1", "E1", "I10", D(2024, 1, 1))])
    assert set(labeled) == {"tab", "keep"}
    assert rejects == [("notes", "accented", "short_text"), ("notes", "blank", "empty_text"),
                       ("notes", "padded", "short_text")]


# ---- replaying an earlier run (`--as-of-run`, `--as-of-timestamp`) --------------------------------------
WORDS = ["cough", "fever", "rash", "knee", "diet", "sleep", "dose", "walk", "chest", "review", "clinic", "stable"]


def story(rnd: random.Random) -> str:
    w = lambda: rnd.choice(WORDS)  # noqa: E731
    return f"Patient reports {w()} and {w()} today. {w()} {w()} noted on exam. Plan {w()} review next week."


def first_snapshot(n_patients: int = 10) -> tuple[list, list]:
    """(notes, diagnoses): two notes a patient (January, March) and the chronic I10 on one encounter of
    February with no note. Seen on one encounter, I10 is imputed nowhere."""
    rnd, notes, diagnoses = random.Random(1), [], []
    for p in range(n_patients):
        for enc, date, code in ((f"E{p}a", D(2024, 1, 10), "J06.9"), (f"E{p}b", D(2024, 3, 1), "S93.401A")):
            notes.append(note(f"{enc}-n", patient=f"P{p}", encounter=enc, date=date, text=story(rnd)))
            diagnoses.append((f"P{p}", enc, code, date))
        diagnoses.append((f"P{p}", f"E{p}x", "I10", D(2024, 2, 1)))
    return notes, diagnoses


def growth(n_patients: int = 10) -> tuple[list, list]:
    """What lands later: for every other patient I10 again, on an April encounter with a note. Now on two
    encounters, I10 is chronic since February and is imputed into the March note written before it."""
    rnd = random.Random(2)
    notes = [note(f"E{p}c-n", patient=f"P{p}", encounter=f"E{p}c", date=D(2024, 4, 1), text=story(rnd))
             for p in range(0, n_patients, 2)]
    return notes, [(f"P{p}", f"E{p}c", "I10", D(2024, 4, 1)) for p in range(0, n_patients, 2)]


def write_inputs(wh, spark, rows: tuple[list, list], mode: str = "overwrite") -> None:
    wh.write(spark.createDataFrame(rows[0], t.NOTES_SCHEMA), "ehr.notes", mode=mode)
    wh.write(spark.createDataFrame(rows[1], t.DIAGNOSES_SCHEMA), "ehr.diagnoses", mode=mode)


def table_rows(wh, name: str, version: int | None = None) -> list[tuple]:
    return sorted(tuple(r) for r in wh.table(name, version).collect())


def test_as_of_run_replays_an_etl_row_for_row_after_both_tables_grew(wh, spark):
    wh.cfg.etl.min_code_count = 0
    write_inputs(wh, spark, first_snapshot())
    first = run_etl(wh, wh.cfg)
    labeled, vocab = "bertxml.labeled_notes", "bertxml.label_vocab"
    first_notes = table_rows(wh, labeled, first["outputs"][labeled])
    first_vocab = table_rows(wh, vocab, first["outputs"][vocab])
    assert len(first_notes) == 20 and all(r.imputed_codes == [] for r in wh.table(labeled).collect())
    between = dt.datetime.now(dt.timezone.utc).isoformat()  # after the first snapshot, before the growth

    write_inputs(wh, spark, growth(), mode="append")
    now = run_etl(wh, wh.cfg)
    grown = {r.note_id: r for r in wh.table(labeled).collect()}
    assert now["labeled_notes"] == len(grown) == 25
    assert grown["E0b-n"].imputed_codes == ["I10"] and grown["E1b-n"].imputed_codes == []  # an old note's labels changed
    assert table_rows(wh, labeled) != first_notes

    as_of_time = run_etl(wh, wh.cfg, as_of_timestamp=between)
    assert table_rows(wh, labeled) == first_notes and as_of_time["labeled_notes"] == 20

    # The replay uses the first run's ETL settings, not the config's as it stands now.
    wh.cfg.etl.min_code_count, wh.cfg.etl.split_salt = 100, "another-split"
    replay = run_etl(wh, wh.cfg, as_of_run=first["run_id"])
    assert table_rows(wh, labeled) == first_notes and replay["labeled_notes"] == len(first_notes)
    assert table_rows(wh, vocab) == first_vocab
    runs = {r.run_id: json.loads(r.inputs) for r in wh.table("bertxml.job_runs").collect()}
    versions = lambda run_id: {k: (v["source"], v["version"]) for k, v in runs[run_id].items()}  # noqa: E731
    assert versions(first["run_id"]) == versions(as_of_time["run_id"]) == versions(replay["run_id"]) == \
        {"notes": ("ehr.notes", 0), "diagnoses": ("ehr.diagnoses", 0)}
    assert versions(now["run_id"]) == {"notes": ("ehr.notes", 1), "diagnoses": ("ehr.diagnoses", 1)}
    assert runs[replay["run_id"]]["notes"]["as_of_run"] == first["run_id"]
    lineage = json.loads(spark.sql(f"DESCRIBE HISTORY {labeled} LIMIT 1").first().userMetadata)
    assert lineage["run_id"] == replay["run_id"] and lineage["inputs"]["diagnoses"]["version"] == 0


def test_as_of_run_names_a_run_that_cannot_be_replayed(wh, spark):
    with pytest.raises(ReplayError, match="run etl-nope is not in bertxml.job_runs"):
        run_etl(wh, wh.cfg, as_of_run="etl-nope")
    with pytest.raises(FileNotFoundError):
        run_etl(wh, wh.cfg)  # no input tables: a failed run
    with job_run(wh, "vocab"):
        pass
    runs = {r.job: r.run_id for r in wh.table("bertxml.job_runs").collect()}
    with pytest.raises(ReplayError, match=f"etl run {runs['etl']} did not succeed \\(failed: FileNotFoundError"):
        run_etl(wh, wh.cfg, as_of_run=runs["etl"])
    with pytest.raises(ReplayError, match=f"run {runs['vocab']} is a vocab run: --as-of-run takes an etl run"):
        run_etl(wh, wh.cfg, as_of_run=runs["vocab"])
    with pytest.raises(ValueError, match="is not a timestamp"):
        run_etl(wh, wh.cfg, as_of_timestamp="last tuesday")


def test_label_texts_add_the_icd10_category_and_inclusion_terms_only_when_asked():
    labels = [{"code": "E11.9", "description": "Type 2 diabetes mellitus without complications"},
              {"code": "I10", "description": "Essential (primary) hypertension"},
              {"code": "C34.90", "description": "Malignant neoplasm of unspecified part of unspecified bronchus or lung"},
              {"code": "E11.65", "description": None}, {"code": "Q99.X9", "description": "not in ICD-10-CM"}]
    assert label_texts(labels) == [row["description"] or "" for row in labels]
    assert label_texts(labels, ["description", "category"]) == [
        "Type 2 diabetes mellitus without complications. Type 2 diabetes mellitus",
        "Essential (primary) hypertension",  # a category has no parent category
        "Malignant neoplasm of unspecified part of unspecified bronchus or lung. Malignant neoplasm of bronchus and lung",
        "Type 2 diabetes mellitus",
        "not in ICD-10-CM. Other chromosome abnormalities, not elsewhere classified"]
    texts = label_texts(labels, ["description", "category", "inclusion_terms"])
    assert texts[2].endswith(". Lung cancer NOS") and texts[4] == "not in ICD-10-CM. Other chromosome abnormalities, " \
        "not elsewhere classified"
    with pytest.raises(ValueError, match="label_text"):
        label_texts(labels, ["category"])
