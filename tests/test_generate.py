"""bertxml.etl.generate: schemas, determinism, the code universe, and the rows the ETL must drop or reject.

Spark runs a 300-note warehouse (the session-scoped `spark` fixture of conftest.py); the statistical
checks run the same per-patient generator in plain Python over more patients, which is what each Spark
task does, so they stay fast.
"""
import datetime as dt
import re
from collections import Counter, defaultdict, namedtuple
from dataclasses import replace

import pytest

from bertxml.config import GenerateConfig
from bertxml.etl.span import LAST_DAY, MAX_DAYS, MIN_DAYS, check_generate_config, last_date, n_patients, span_days
from bertxml.etl.generate import generate_warehouse, run_generate
from bertxml.etl.patients import MALFORMED_CODES, UNKNOWN_SHAPED_CODES, PatientGenerator
from bertxml.etl.lexicon import code_catalog, load_lexicon
from bertxml.etl.icd import ICD10_SHAPE, chronic_codes, icd10cm_descriptions, normalize_code
from bertxml.platform.tables import DIAGNOSES_SCHEMA, NOTES_SCHEMA

SMALL = GenerateConfig(notes=300, seed=11, partitions=2)
# higher defect rates for the checks that every category shows up in a small sample
DEFECTIVE = replace(SMALL, drop_rate=0.05, bad_row_rate=0.04)


def _sorted(rows):
    return sorted(rows, key=lambda r: tuple("" if v is None else str(v) for v in r))


@pytest.fixture(scope="module")
def small(spark):
    notes, diagnoses = generate_warehouse(spark, SMALL)
    return _sorted(notes.collect()), _sorted(diagnoses.collect())


Note = namedtuple("Note", [f.name for f in NOTES_SCHEMA.fields])
Diagnosis = namedtuple("Diagnosis", [f.name for f in DIAGNOSES_SCHEMA.fields])


@pytest.fixture(scope="module")
def defective():
    """Rows as Spark would write them (test_spark_rows_are_the_per_patient_generator_rows), dates as days."""
    return ([Note(*r) for r in _python_rows(DEFECTIVE, "notes")],
            [Diagnosis(*r) for r in _python_rows(DEFECTIVE, "diagnoses")])


def _python_rows(cfg: GenerateConfig, kind: str, patients: int | None = None) -> list[tuple]:
    gen = PatientGenerator(cfg)
    rows_of = gen.note_rows if kind == "notes" else gen.diagnosis_rows
    return [row for i in range(patients or n_patients(cfg)) for row in rows_of(i)]


# ---- shape ---------------------------------------------------------------------------------------------
def test_schemas_match_exactly(spark):
    notes, diagnoses = generate_warehouse(spark, SMALL)
    assert notes.schema == NOTES_SCHEMA
    assert diagnoses.schema == DIAGNOSES_SCHEMA


def test_sizes_and_ids(small):
    notes, diagnoses = small
    assert 0.8 * SMALL.notes < len(notes) < 1.25 * SMALL.notes
    assert len({n.patient_id for n in notes if n.patient_id}) == n_patients(SMALL)
    for n in notes:
        assert re.fullmatch(r"N\d{11}", n.note_id) and re.fullmatch(r"E\d{9}", n.encounter_id)
        assert n.patient_id is None or re.fullmatch(r"P\d{7}", n.patient_id)
        assert n.encounter_id[1:8] == n.note_id[1:8] and n.note_id[8:10] == n.encounter_id[8:10]
    assert {d.encounter_id for d in diagnoses} <= {n.encounter_id for n in notes}


# ---- determinism -----------------------------------------------------------------------------------------
def test_same_seed_same_rows_other_seed_other_rows(spark, small):
    notes, diagnoses = generate_warehouse(spark, SMALL)
    assert _sorted(notes.collect()) == small[0]
    assert _sorted(diagnoses.collect()) == small[1]
    other, _ = generate_warehouse(spark, replace(SMALL, seed=12))
    assert _sorted(other.collect()) != small[0]


def test_rows_do_not_depend_on_partitioning(spark, monkeypatch, small):
    import bertxml.etl.generate as generate

    monkeypatch.setattr(generate, "MIN_PATIENTS_PER_TASK", 10)        # 3 tasks instead of 1
    notes, _ = generate_warehouse(spark, replace(SMALL, partitions=3))
    assert notes.rdd.getNumPartitions() == 3
    assert _sorted(notes.collect()) == small[0]


def test_spark_rows_are_the_per_patient_generator_rows(small):
    """Spark only parallelises: each patient's rows come from (seed, patient index) alone."""
    epoch = dt.date(1970, 1, 1)
    expected = [(r[0], r[1], r[2], epoch + dt.timedelta(days=r[3]), *r[4:]) for r in _python_rows(SMALL, "notes")]
    assert _sorted(expected) == [tuple(r) for r in small[0]]
    gen_a, gen_b = PatientGenerator(SMALL), PatientGenerator(SMALL)
    assert gen_a.note_rows(7) == gen_b.note_rows(7)
    assert gen_a.note_rows(7) != gen_a.note_rows(8)
    assert gen_a.diagnosis_rows(7) == gen_b.diagnosis_rows(7)


# ---- the code universe -----------------------------------------------------------------------------------
def test_catalog_is_real_long_tailed_and_deterministic():
    descriptions, chronic = icd10cm_descriptions(), chronic_codes()
    catalog = code_catalog(400, 7)
    assert len(catalog) == 400 and catalog["code"].is_unique
    assert all(c in descriptions for c in catalog["code"])
    assert list(catalog["description"]) == [descriptions[c] for c in catalog["code"]]
    assert list(catalog["is_chronic"]) == [c in chronic for c in catalog["code"]]
    weights = catalog["weight"].to_numpy()
    assert abs(weights.sum() - 1) < 1e-9 and (weights[:-1] >= weights[1:]).all()
    assert weights[0] > 100 * weights[-1]                                # Zipf: a few codes dominate
    assert catalog["is_chronic"][:30].mean() >= 0.5                     # the common codes are mostly chronic
    assert code_catalog(400, 7).equals(catalog)
    assert set(code_catalog(400, 8)["code"]) != set(catalog["code"])   # the random tail follows the seed
    assert list(code_catalog(20, 7)["code"]) == list(catalog["code"][:20])


def test_lexicon_codes_exist_and_carry_cues():
    descriptions = icd10cm_descriptions()
    core = load_lexicon()["core_codes"]
    assert len(core) >= 60
    assert [e["code"] for e in core if e["code"] not in descriptions] == []
    by_code = {e["code"]: e for e in core}
    assert "HTN" in by_code["I10"]["abbr"] and any("metformin" in m for m in by_code["E11.9"]["meds"])
    assert any("levothyroxine" in m for m in by_code["E03.9"]["meds"])
    assert any("apixaban" in m for m in by_code["I48.91"]["meds"])


def test_code_frequencies_are_long_tailed():
    cfg = replace(SMALL, notes=10000)
    catalog = set(code_catalog(cfg.n_codes, cfg.seed)["code"])
    codes = [normalize_code(r[2]) for r in _python_rows(cfg, "diagnoses") if r[2]]
    ranked = [n for _, n in Counter(c for c in codes if c in catalog).most_common()]
    total = sum(ranked)
    assert len(ranked) > 300                                   # hundreds of codes seen...
    assert sum(ranked[:10]) > 0.2 * total                      # ...a few very common (I10, E78.5, ...)
    assert sum(ranked[len(ranked) // 2:]) < 0.2 * total        # ...and a long tail of rare ones
    assert ranked[0] > 20 * ranked[len(ranked) // 2]


# ---- patients, encounters, chronic codes ----------------------------------------------------------------
def test_encounter_dates_increase_per_patient(small):
    notes, diagnoses = small
    enc_date = {n.encounter_id: n.note_date for n in notes}
    by_patient = defaultdict(dict)
    for n in notes:
        if n.patient_id:
            by_patient[n.patient_id][n.encounter_id] = n.note_date
    for encounters in by_patient.values():
        dates = [encounters[e] for e in sorted(encounters)]
        assert all(a < b for a, b in zip(dates, dates[1:]))
        assert dates[0] > last_date() - dt.timedelta(days=span_days(SMALL)) and dates[-1] <= last_date()
    assert all(d.diagnosis_date == enc_date[d.encounter_id] for d in diagnoses)


def test_the_span_grows_with_the_size_up_to_three_years():
    assert last_date() == dt.date(2025, 12, 31)
    assert span_days(SMALL) == MIN_DAYS                                  # 300 notes: four weeks
    assert 35 <= span_days(replace(SMALL, notes=1500)) <= 50             # the demo: about six weeks
    sizes = [300, 1500, 5000, 20000, 40000, 100000, 1000000]
    spans = [span_days(replace(SMALL, notes=n)) for n in sizes]
    assert spans == sorted(spans) and spans[-1] == spans[-2] == MAX_DAYS
    assert last_date() - dt.timedelta(days=MAX_DAYS - 1) == dt.date(2023, 1, 1)


def test_dates_follow_a_hospital_week_and_patients_keep_histories():
    """The demo's size: every day of the span has notes, weekdays about 2.5x weekends, the newest nights
    as full as any, and most patients seen on several days weeks apart."""
    cfg = replace(SMALL, notes=1500, seed=7)
    gen = PatientGenerator(cfg)
    patients = [gen.structure(i) for i in range(n_patients(cfg))]
    per_day = Counter()
    for p in patients:
        for e in p.encounters:
            per_day[e.day] += len(e.notes)
    first = LAST_DAY - span_days(cfg) + 1
    assert set(per_day) == set(range(first, LAST_DAY + 1))
    weekday = [n for d, n in per_day.items() if (epoch_day(d)).weekday() < 5]
    weekend = [n for d, n in per_day.items() if (epoch_day(d)).weekday() >= 5]
    assert len(weekend) >= 10 and 30 <= sum(weekday) / len(weekday) <= 60
    assert sum(weekday) / len(weekday) > 1.8 * sum(weekend) / len(weekend)
    assert min(per_day[d] for d in range(LAST_DAY - 2, LAST_DAY + 1)) >= 30      # Mon-Wed, 2025-12-29..31
    several = [p for p in patients if len(p.encounters) >= 2]
    assert len(several) > 0.7 * len(patients)
    spans = sorted(p.encounters[-1].day - p.encounters[0].day for p in several)
    assert spans[len(spans) // 2] >= 14


def epoch_day(day: int) -> dt.date:
    return dt.date(1970, 1, 1) + dt.timedelta(days=day)


def test_chronic_codes_recur_but_not_always(small):
    chronic = chronic_codes()
    seen = defaultdict(set)
    for d in small[1]:
        code = normalize_code(d.icd10_code)
        if code in chronic:
            seen[(d.patient_id, code)].add(d.encounter_id)
    assert any(len(encounters) >= 2 for encounters in seen.values())
    # with more patients: some chronic codes skip a later encounter, the gap the ETL's imputation fills
    gen = PatientGenerator(replace(SMALL, notes=3000))
    gaps = recurrences = 0
    for i in range(200):
        p = gen.structure(i)
        for code, onset in p.chronic.items():
            later = [code in e.codes for e in p.encounters[onset + 1:]]
            recurrences += sum(later)
            gaps += len(later) - sum(later)
    assert recurrences > 0 and gaps > 0
    assert 0.45 < recurrences / (recurrences + gaps) < 0.75


def test_codes_per_encounter():
    gen = PatientGenerator(replace(SMALL, notes=3000))
    sizes = [len(e.codes) for i in range(300) for e in gen.structure(i).encounters]
    assert min(sizes) >= 1 and max(sizes) <= 8
    assert 1.5 < sum(sizes) / len(sizes) < 4.5


# ---- text ------------------------------------------------------------------------------------------------
def test_note_lengths_have_a_long_tail(small):
    words = sorted(len(n.text.split()) for n in small[0] if n.text)
    assert 150 <= words[len(words) // 2] <= 600
    assert sum(w > 1024 for w in words) >= 5                  # past 1,024 tokens even before WordPiece
    assert sum(w > 1024 for w in words) < 0.2 * len(words)


def test_notes_mention_codes_in_mixed_forms_with_distractors():
    cfg = replace(SMALL, notes=1000)
    notes = [r for r in _python_rows(cfg, "notes") if r[7] and len(r[7]) >= 50]
    text = "\n".join(r[7] for r in notes)
    assert "HTN" in text and "hypertension" in text.lower()            # abbreviation and name
    assert "metformin" in text or "levothyroxine" in text               # medication cues
    for section in ("CHIEF COMPLAINT:", "HISTORY OF PRESENT ILLNESS:", "PAST MEDICAL HISTORY:", "MEDICATIONS:",
                    "REVIEW OF SYSTEMS:", "PHYSICAL EXAM:", "ASSESSMENT AND PLAN:"):
        assert section in text
    assert re.search(r"Vitals: BP \d+/\d+, HR \d+", text)
    assert re.search(r"No history of|Denies any history of|was considered but ruled out", text)
    assert re.search(r"Family history of|FHx:|family history of", text)
    # a code's name often appears in a note whose encounter does not have it (negated or family history)
    gen = PatientGenerator(cfg)
    absent_mentions = 0
    for i in range(100):
        p = gen.structure(i)
        rows = gen.note_rows(i)
        for e in p.encounters:
            coded = {gen.codes[c] for c in e.codes} | {gen.codes[c] for c in p.chronic}
            for row in rows:
                if row[2] == e.encounter_id and row[7] and "hypertension" in row[7].lower():
                    absent_mentions += "I10" not in coded
    assert absent_mentions > 0


# ---- the rows the ETL must drop or reject --------------------------------------------------------------
def test_notes_to_drop_exist_in_every_category(defective):
    notes, _ = defective
    assert any(n.status == "erroneous" for n in notes)
    assert any(n.author_role == "student" for n in notes)
    assert any(n.note_type == "miscellaneous" for n in notes)
    assert any(n.text and len(n.text) < 50 for n in notes)
    assert any(n.text is None for n in notes) and any(n.text == "" for n in notes)
    assert any(n.patient_id is None for n in notes)
    ids = Counter(n.note_id for n in notes)
    assert any(k > 1 for k in ids.values())
    # every duplicated id is one extra row, and the copies share patient and encounter
    for note_id in [k for k, v in ids.items() if v > 1]:
        copies = [n for n in notes if n.note_id == note_id]
        assert len(copies) == 2 and copies[0].encounter_id == copies[1].encounter_id


def test_diagnoses_to_reject_exist_in_every_category(defective):
    notes, diagnoses = defective
    descriptions = icd10cm_descriptions()
    kinds = Counter()
    for d in diagnoses:
        code = d.icd10_code
        norm = normalize_code(code) if code else None
        if norm in descriptions:
            kinds["variant" if code != norm else "clean"] += 1
            assert code == norm or code.strip().upper().replace(".", "") == norm.replace(".", "")
        elif norm and re.match(ICD10_SHAPE, norm):
            kinds["unknown"] += 1
            assert code in UNKNOWN_SHAPED_CODES
        else:
            kinds["malformed"] += 1
            assert code in MALFORMED_CODES or code.endswith("X!")
    assert kinds["variant"] and kinds["unknown"] and kinds["malformed"]
    assert kinds["clean"] > 0.8 * len(diagnoses)
    without = {n.encounter_id for n in notes} - {d.encounter_id for d in diagnoses}
    assert without                                             # encounters whose notes have no codes


def test_defect_rates_follow_the_config():
    cfg = replace(SMALL, notes=20000)
    notes = _python_rows(cfg, "notes", patients=2000)
    n = len(notes)
    share = lambda pred: sum(1 for r in notes if pred(r)) / n  # noqa: E731
    assert 0.012 < share(lambda r: r[6] == "erroneous") < 0.03        # drop_rate 0.02
    assert 0.012 < share(lambda r: r[5] == "student") < 0.03
    assert 0.012 < share(lambda r: r[4] == "miscellaneous") < 0.03
    assert 0.012 < share(lambda r: r[7] is not None and 0 < len(r[7]) < 50) < 0.03
    assert 0.004 < share(lambda r: not r[7]) < 0.02                   # bad_row_rate 0.01
    assert 0.004 < share(lambda r: r[1] is None) < 0.02
    assert 0.0 < 1 - len({r[0] for r in notes}) / n < 0.02


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="drop_rate"):
        check_generate_config(replace(SMALL, drop_rate=0.2, bad_row_rate=0.2))
    with pytest.raises(ValueError, match="notes_per_encounter"):
        check_generate_config(replace(SMALL, notes_per_encounter=0.5))
    with pytest.raises(ValueError, match="long_note_rate"):
        check_generate_config(replace(SMALL, long_note_rate=1.5))


# ---- the job ---------------------------------------------------------------------------------------------
def test_land_from_writes_the_history_then_the_late_nights(wh, small):
    """Two commits per table: the rows before land_from, then the rest; together the one-commit rows."""
    notes_table, diagnoses_table = wh.cfg.warehouse.notes, wh.cfg.warehouse.diagnoses
    land = last_date() - dt.timedelta(days=2)
    result = run_generate(wh, SMALL, land_from=land.isoformat())
    assert result["history_versions"] == {notes_table: 0, diagnoses_table: 0}
    assert result["versions"] == {notes_table: 1, diagnoses_table: 1}
    assert result["notes"] == len(small[0]) and result["diagnoses"] == len(small[1])
    assert _sorted(wh.table(notes_table).collect()) == small[0]
    assert _sorted(wh.table(diagnoses_table).collect()) == small[1]
    history = wh.table(notes_table, version=0).collect()
    assert _sorted(history) == [n for n in small[0] if n.note_date < land]
    assert 0 < len(history) < len(small[0])
    assert _sorted(wh.table(diagnoses_table, version=0).collect()) == [d for d in small[1] if d.diagnosis_date < land]
    with pytest.raises(ValueError, match="land_from"):
        run_generate(wh, SMALL, land_from="29/12/2025")


def test_run_generate_writes_both_tables_and_never_logs_text(wh, caplog, small):
    result = run_generate(wh, SMALL)
    notes_table, diagnoses_table = wh.cfg.warehouse.notes, wh.cfg.warehouse.diagnoses
    assert result["notes"] == len(small[0]) == wh.table(notes_table).count()
    assert result["diagnoses"] == len(small[1]) == wh.table(diagnoses_table).count()
    assert result["patients"] == n_patients(SMALL)
    assert result["versions"] == {notes_table: 0, diagnoses_table: 0}
    assert wh.table(notes_table).schema == NOTES_SCHEMA
    assert "ehr.notes" in caplog.text and str(result["notes"]) in caplog.text
    for note in small[0][::10]:
        for line in (note.text or "").splitlines():
            if len(line) > 30:
                assert line not in caplog.text
