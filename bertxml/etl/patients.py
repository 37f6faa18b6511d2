"""One synthetic patient, structure then text (`PatientGenerator`): chronic conditions that recur on only
some later encounters, acute codes per encounter, notes in sections that mention most of the encounter's
codes in mixed forms, and the defects the ETL must drop or reject (`NOTE_DEFECTS`). Each patient comes from
its own RNG seeded with (seed, patient index), so a Spark task can make any patient alone.
"""
from __future__ import annotations

import bisect
import dataclasses
import datetime as dt
import math
import random

import numpy as np
import pandas as pd
import pyarrow as pa

from bertxml.config import GenerateConfig
from bertxml.etl.lexicon import code_catalog, load_lexicon
from bertxml.etl.span import LAST_DAY, WEEKEND_SHARE, check_generate_config, is_weekend, span_days

CHRONIC_PER_PATIENT = 1.8        # Poisson mean of a patient's chronic conditions
MAX_CHRONIC = 6
ACUTE_PER_ENCOUNTER = 1.3        # Poisson mean of acute codes per encounter
MAX_CODES_PER_ENCOUNTER = 8
CHRONIC_RECUR = 0.6              # a chronic code is coded again at a later encounter with this probability
MENTION = 0.85                   # each encounter code is mentioned in a note with this probability
MED_CUE = 0.3                    # ... and, when it has a medication cue, named only through the drug
LONG_WORDS = (1100, 2500)        # words in a long note: past 1,024 WordPiece tokens
NORMAL_WORDS = (150, 600)
NOTE_TYPES = {"progress_note": 0.50, "history_and_physical": 0.12, "consult_note": 0.12,
              "discharge_summary": 0.10, "nursing_note": 0.16}
AUTHOR_ROLES = {"physician": 0.55, "resident": 0.25, "nurse_practitioner": 0.20}
NURSE_ROLES = {"nurse": 0.85, "nurse_practitioner": 0.15}
AMENDED = 0.06                   # share of good notes with status 'amended' (the rest 'final')


# Defects, each drawn per note from one uniform so they never overlap: the paper's filters at
# drop_rate each, then plain bad rows at bad_row_rate each.
NOTE_DEFECTS = (("erroneous", "drop"),        # status = 'erroneous'
                ("student", "drop"),          # author_role = 'student'
                ("miscellaneous", "drop"),    # note_type = 'miscellaneous'
                ("short_text", "drop"),       # fewer than 50 characters
                ("blank_text", "bad"),        # null or '' text, half each
                ("null_patient_id", "bad"),
                ("duplicate_note_id", "bad"))  # an extra row with the same note_id: half an identical


                                               # re-load, half an amended copy with different text
# Per diagnosis row at bad_row_rate each: the code written in a variant the ETL normalises and keeps
# (' e119 ', 'i10'), an extra malformed row, an extra well-shaped unknown code; and per encounter at
# bad_row_rate: no diagnosis rows at all (its notes still mention codes).
UNKNOWN_SHAPED_CODES = ("Z99.999", "Q00.99", "E11.99", "I10.1", "K21.99", "J44.99")
MALFORMED_CODES = ("", None, "12345", "N/A", "#REF!", "ICD10")   # plus a corrupted real code, 'E11..9X!'
ARROW_BATCH_ROWS = 2048          # rows per Arrow batch handed back to Spark
NOTES_RAW = ("note_id string, patient_id string, encounter_id string, day int, note_type string, "
             "author_role string, status string, text string")
DIAGNOSES_RAW = "patient_id string, encounter_id string, icd10_code string, day int"
NOTES_ARROW = pa.schema([(n, pa.int32() if n == "day" else pa.string()) for n in
                          ("note_id", "patient_id", "encounter_id", "day", "note_type", "author_role",
                           "status", "text")])
DIAGNOSES_ARROW = pa.schema([(n, pa.int32() if n == "day" else pa.string()) for n in
                              ("patient_id", "encounter_id", "icd10_code", "day")])


def record_batch(rows: list[tuple], schema: pa.Schema) -> pa.RecordBatch:
    columns = list(zip(*rows))
    return pa.RecordBatch.from_arrays([pa.array(col, type=f.type) for col, f in zip(columns, schema)],
                                      schema=schema)


# ---- one patient: structure, then text ----------------------------------------------------------------
def _poisson(r: random.Random, lam: float) -> int:
    """Knuth's method: exact, and fast for the small means used here."""
    if lam <= 0:
        return 0
    if lam > 30:
        return max(0, round(r.gauss(lam, math.sqrt(lam))))
    limit, k, p = math.exp(-lam), 0, r.random()
    while p > limit:
        k += 1
        p *= r.random()
    return k


def _cumulative(weights) -> list[float]:
    return np.cumsum(np.asarray(list(weights), dtype=float)).tolist()


def _draw(r: random.Random, items: list, cum: list[float]):
    return items[bisect.bisect_right(cum, r.random() * cum[-1])]


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


@dataclasses.dataclass
class _Encounter:
    encounter_id: str
    day: int                      # days since 1970-01-01
    codes: list                   # catalogue indices coded at this encounter
    active_chronic: list          # the patient's chronic conditions with onset at or before it
    diagnosis_codes: list         # icd10_code strings as written to ehr.diagnoses (with defects)
    notes: list                   # (note_id, note_type, author_role, status, defect or None)


@dataclasses.dataclass
class _Patient:
    patient_id: str
    age: int
    sex: str
    weight_kg: float
    chronic: dict                 # catalogue index -> onset encounter
    text_seed: int
    encounters: list


class PatientGenerator:
    """Builds one patient's rows from (seed, patient index) alone: picklable, so Spark tasks run it."""

    def __init__(self, cfg: GenerateConfig, catalog: pd.DataFrame | None = None, lexicon: dict | None = None):
        check_generate_config(cfg)
        self.cfg = cfg
        catalog = code_catalog(cfg.n_codes, cfg.seed) if catalog is None else catalog
        lex = load_lexicon() if lexicon is None else lexicon
        self.codes = list(catalog["code"])
        weights = list(catalog["weight"])
        chronic = list(catalog["is_chronic"])
        self.chronic_idx = [k for k, c in enumerate(chronic) if c]
        self.chronic_cum = _cumulative([weights[k] for k in self.chronic_idx]) if self.chronic_idx else []
        self.acute_idx = [k for k, c in enumerate(chronic) if not c] or list(range(len(chronic)))
        self.acute_cum = _cumulative([weights[k] for k in self.acute_idx])
        self.all_idx = list(range(len(self.codes)))
        self.all_cum = _cumulative(weights)
        self.desc_forms = [list(f) for f in catalog["description_forms"]]
        self.abbr = [list(f) for f in catalog["abbreviations"]]
        self.syn = [list(f) for f in catalog["synonyms"]]
        self.meds = [list(f) for f in catalog["medications"]]
        self.symptom = list(catalog["is_symptom"])
        self.note_types, self.note_type_cum = list(NOTE_TYPES), _cumulative(NOTE_TYPES.values())
        self.roles, self.role_cum = list(AUTHOR_ROLES), _cumulative(AUTHOR_ROLES.values())
        self.nurse_roles, self.nurse_role_cum = list(NURSE_ROLES), _cumulative(NURSE_ROLES.values())
        # encounter days: the span's days weighted by a weekday's or a weekend day's volume
        self.days = list(range(LAST_DAY - span_days(cfg) + 1, LAST_DAY + 1))
        self.day_cum = _cumulative(WEEKEND_SHARE if is_weekend(d) else 1.0 for d in self.days)
        d, b = cfg.drop_rate, cfg.bad_row_rate
        bounds, edge = [], 0.0
        for defect, kind in NOTE_DEFECTS:
            edge += d if kind == "drop" else b
            bounds.append((edge, defect))
        self.defect_bounds = bounds
        self.lex = {k: v for k, v in lex.items() if k != "core_codes"}
        self.lab_panels = [(panel, [(name, f" {unit}" if unit else "", float(lo), float(hi) - float(lo),
                                     f"{{:.{int(dec)}f}}") for name, unit, lo, hi, dec in results])
                           for panel, results in lex["lab_panels"].items()]

    # -- structure: everything both tables need; the diagnoses pass stops here --
    def structure(self, i: int) -> _Patient:
        cfg = self.cfg
        seeds = np.random.default_rng([cfg.seed, i]).integers(0, 2 ** 63, size=2)
        r = random.Random(int(seeds[0]))
        number = f"{i + 1:07d}"
        age, sex, weight_kg = 18 + r.randrange(72), ("woman" if r.random() < 0.52 else "man"), 50 + 70 * r.random()
        n_enc = min(99, len(self.days) // 2, 1 + _poisson(r, cfg.encounters_per_patient - 1))
        taken: set[int] = set()                  # distinct days, each drawn by the day's volume
        total = self.day_cum[-1]
        while len(taken) < n_enc:
            taken.add(self.days[bisect.bisect_right(self.day_cum, r.random() * total)])
        days = sorted(taken)                     # strictly increasing dates
        chronic: dict[int, int] = {}
        want = min(_poisson(r, CHRONIC_PER_PATIENT), MAX_CHRONIC, len(self.chronic_idx))
        for _ in range(8 * want):
            if len(chronic) >= want:
                break
            c = _draw(r, self.chronic_idx, self.chronic_cum)
            if c not in chronic:
                chronic[c] = 0 if r.random() < 0.5 else r.randrange(n_enc)
        encounters = []
        b = cfg.bad_row_rate
        for j, day in enumerate(days):
            # a chronic code is coded at its onset, then only at some later encounters (paper §4.1)
            codes = [c for c, onset in chronic.items() if onset == j or (onset < j and r.random() < CHRONIC_RECUR)]
            n_acute = _poisson(r, ACUTE_PER_ENCOUNTER) or (0 if codes else 1)
            for _ in range(4 * n_acute):
                if n_acute == 0 or len(codes) >= MAX_CODES_PER_ENCOUNTER:
                    break
                c = _draw(r, self.acute_idx, self.acute_cum)
                if c not in codes:
                    codes.append(c)
                    n_acute -= 1
            encounter_id = f"E{number}{j:02d}"
            diagnosis_codes = [] if r.random() < b else self._diagnosis_codes(r, codes)
            notes = []
            for k in range(min(99, 1 + _poisson(r, cfg.notes_per_encounter - 1))):
                notes.append(self._note_meta(r, f"N{number}{j:02d}{k:02d}"))
            encounters.append(_Encounter(encounter_id, day, codes,
                                         [c for c, onset in chronic.items() if onset <= j],
                                         diagnosis_codes, notes))
        return _Patient(f"P{number}", age, sex, weight_kg, chronic, int(seeds[1]), encounters)

    def _diagnosis_codes(self, r: random.Random, codes: list) -> list:
        b, out = self.cfg.bad_row_rate, []
        for c in codes:
            code = self.codes[c]
            if r.random() < b:                                    # kept after normalisation
                bare = code.replace(".", "")
                code = r.choice((f" {bare.lower()} ", code.lower(), bare, f"{code} "))
            out.append(code)
            u = r.random()
            if u < b:
                bad = r.choice(MALFORMED_CODES + ("corrupt",))
                out.append(f"{self.codes[c][:3]}..{self.codes[c][4:]}X!" if bad == "corrupt" else bad)
            elif u < 2 * b:
                out.append(r.choice(UNKNOWN_SHAPED_CODES))
        return out

    def _note_meta(self, r: random.Random, note_id: str) -> tuple:
        note_type = _draw(r, self.note_types, self.note_type_cum)
        role = (_draw(r, self.nurse_roles, self.nurse_role_cum) if note_type == "nursing_note"
                else _draw(r, self.roles, self.role_cum))
        status = "amended" if r.random() < AMENDED else "final"
        u, defect = r.random(), None
        for edge, name in self.defect_bounds:
            if u < edge:
                defect = name
                break
        if defect == "erroneous":
            status = "erroneous"
        elif defect == "student":
            role = "student"
        elif defect == "miscellaneous":
            note_type = "miscellaneous"
        return note_id, note_type, role, status, defect

    # -- rows --
    def diagnosis_rows(self, i: int) -> list[tuple]:
        """(patient_id, encounter_id, icd10_code, day) rows of patient i."""
        p = self.structure(i)
        return [(p.patient_id, e.encounter_id, code, e.day) for e in p.encounters for code in e.diagnosis_codes]

    def note_rows(self, i: int) -> list[tuple]:
        """(note_id, patient_id, encounter_id, day, note_type, author_role, status, text) rows of patient i."""
        p = self.structure(i)
        r = random.Random(p.text_seed)
        rows = []
        for e in p.encounters:
            date = (dt.date(1970, 1, 1) + dt.timedelta(days=e.day))
            for note_id, note_type, role, status, defect in e.notes:
                if defect == "short_text":
                    text = r.choice(self.lex["short_texts"])
                elif defect == "blank_text":
                    text = None if r.random() < 0.5 else ""
                else:
                    text = self.note_text(r, p, e, note_type, date)
                patient_id = None if defect == "null_patient_id" else p.patient_id
                row = (note_id, patient_id, e.encounter_id, e.day, note_type, role, status, text)
                rows.append(row)
                if defect == "duplicate_note_id":
                    rows.append(row if r.random() < 0.5 else
                                row[:6] + ("amended", f"{text}\nAddendum: {r.choice(self.lex['plan_filler'])}"))
        return rows

    # -- text --
    # Draws below use rand() directly (seq[int(rand() * len(seq))]) rather than Random.choice/randint:
    # the same determinism at a third of the cost, and text is most of the generator's time.
    def _form(self, rand, c: int) -> str:
        u = rand()
        forms = (self.abbr[c] if u < 0.35 else self.syn[c] if u < 0.75 else None) or self.desc_forms[c]
        return forms[int(rand() * len(forms))]

    def _absent(self, rand, p: _Patient, coded: set, chronic_only: bool = False) -> int | None:
        """A code neither coded at this encounter nor among the patient's conditions: a distractor."""
        idx, cum = (self.chronic_idx, self.chronic_cum) if chronic_only and self.chronic_idx else \
            (self.all_idx, self.all_cum)
        total = cum[-1]
        for _ in range(6):
            c = idx[bisect.bisect_right(cum, rand() * total)]
            if c not in coded and c not in p.chronic:
                return c
        return None

    def _lab_panel(self, rand, date: dt.date) -> str:
        when = date - dt.timedelta(days=int(rand() * 30))
        name, results = self.lab_panels[int(rand() * len(self.lab_panels))]
        values = ", ".join([f"{label} {fmt.format(lo + rand() * span)}{unit}"
                            for label, unit, lo, span, fmt in results])
        return f"{when:%m/%d/%Y} {name}: {values}."

    def _vitals(self, rand, p: _Patient | None, prefix: str = "Vitals") -> str:
        """A vitals line; with the patient's weight when p is given (the exam, not the flowsheet)."""
        weight = f", weight {p.weight_kg + rand() * 2 - 1:.1f} kg" if p is not None else ""
        return (f"{prefix}: BP {98 + int(rand() * 70)}/{58 + int(rand() * 40)}, HR {54 + int(rand() * 58)}, "
                f"RR {12 + int(rand() * 11)}, Temp {96.8 + rand() * 3.2:.1f} F, SpO2 {91 + int(rand() * 10)}% on "
                f"room air{weight}.")

    @staticmethod
    def _systems(rand, pool: list, k: int) -> list:
        """k systems of a ROS or exam pool, in the pool's (conventional) order."""
        if k >= len(pool):
            return pool
        start = int(rand() * len(pool))          # a window of consecutive systems, wrapping around
        return [pool[j % len(pool)] for j in sorted(range(start, start + k), key=lambda j: j % len(pool))]

    def note_text(self, r: random.Random, p: _Patient, e: _Encounter, note_type: str, date: dt.date) -> str:
        """One note's text: sections, one sentence per line."""
        lex, rand = self.lex, r.random

        def pick(seq):
            return seq[int(rand() * len(seq))]

        def between(lo: int, hi: int) -> int:
            return lo + int(rand() * (hi - lo + 1))

        form = self._form
        coded = set(e.codes)
        mentioned = [c for c in e.codes if rand() < MENTION]
        cue = {c for c in mentioned if self.meds[c] and rand() < MED_CUE}     # named only through the drug
        long = rand() < self.cfg.long_note_rate
        target = between(*(LONG_WORDS if long else NORMAL_WORDS))

        head = [lex["note_titles"].get(note_type, "CLINICAL NOTE"), f"Date of service: {date:%Y-%m-%d}",
                "CHIEF COMPLAINT:"]
        named = [c for c in mentioned if c not in cue]
        head.append(_cap(form(rand, named[0])) + "." if named and rand() < 0.6 else pick(lex["chief_complaints"]))
        head.append("HISTORY OF PRESENT ILLNESS:")
        history = [form(rand, c) for c in e.active_chronic[:3] if c not in cue and rand() < 0.7]
        head.append(f"{p.age}-year-old {p.sex} with a history of {', '.join(history)}." if history
                    else f"{p.age}-year-old {p.sex} seen today." if e.active_chronic
                    else f"{p.age}-year-old {p.sex} without significant past medical history.")
        for c in named:
            if rand() < 0.5:
                f = form(rand, c)
                head.append(pick(lex["hpi_mention"]).format(f=f, F=_cap(f)))
        for _ in range(between(1, 3)):
            head.append(pick(lex["hpi_filler"]))
        for _ in range(between(0, 2)):
            c = self._absent(rand, p, coded)
            if c is not None and self.symptom[c]:
                f = form(rand, c)
                head.append(pick(lex["negated_symptom"]).format(f=f, F=_cap(f)))

        head.append("PAST MEDICAL HISTORY:")
        pmh = [f"- {form(rand, c)}" for c in e.active_chronic if rand() < 0.75]
        head.extend(pmh or ["- No chronic medical problems."])
        if rand() < 0.5:
            c = self._absent(rand, p, coded)
            if c is not None and not self.symptom[c]:
                f = form(rand, c)
                head.append(pick(lex["negated_condition"]).format(f=f, F=_cap(f)))

        head.append("MEDICATIONS:")
        med_of = {c: pick(self.meds[c]) for c in cue}
        meds = [f"- {m}" for m in med_of.values()]
        meds += [f"- {pick(self.meds[c])}" for c in e.active_chronic
                 if c not in cue and self.meds[c] and rand() < 0.4]
        meds += [f"- {pick(lex['generic_meds'])}" for _ in range(between(0, 3))]
        head.extend(meds or ["- None."])

        head.append("SOCIAL AND FAMILY HISTORY:")
        head.append(pick(lex["social_history"]))
        for _ in range(between(0, 2)):
            c = self._absent(rand, p, coded, chronic_only=True)
            if c is not None:
                rel, f = pick(lex["relatives"]), form(rand, c)
                head.append(pick(lex["family_history"]).format(f=f, F=_cap(f), rel=rel, Rel=_cap(rel)))

        head.append("REVIEW OF SYSTEMS:")
        ros, exam = lex["ros"], lex["exam"]
        for system, negatives in self._systems(rand, ros, len(ros) if long else between(2, 3 + target // 100)):
            head.append(f"{system}: {negatives}.")
        head.append("PHYSICAL EXAM:")
        head.append(self._vitals(rand, p))
        for system, finding in self._systems(rand, exam, len(exam) if long else between(2, 3 + target // 100)):
            head.append(f"{system}: {finding}.")

        plan = ["ASSESSMENT AND PLAN:"]
        order = mentioned[:]
        r.shuffle(order)
        for n, c in enumerate(order, 1):
            if c in cue:
                plan.append(f"{n}. " + pick(lex["plan_med_cue"]).format(m=med_of[c]))
            else:
                f = form(rand, c)
                plan.append(f"{n}. " + pick(lex["plan_mention"]).format(f=f, F=_cap(f)))
        for _ in range(between(0, 2)):
            c = self._absent(rand, p, coded)
            if c is not None and not self.symptom[c]:
                f = form(rand, c)
                plan.append(pick(lex["negated_condition"]).format(f=f, F=_cap(f)))
        for _ in range(between(1, 2)):
            plan.append(pick(lex["plan_filler"]))

        # Pad to the drawn length with what long notes are long with: labs, flowsheets, course.
        words = sum([line.count(" ") + 1 for line in head]) + sum([line.count(" ") + 1 for line in plan])
        labs, course, flow, imaging = [], [], [], []
        if note_type == "nursing_note":
            course_title, course_pool = "NURSING ASSESSMENT:", lex["nursing"]
        elif long or note_type == "discharge_summary":
            course_title, course_pool = "HOSPITAL COURSE:", lex["hospital_course"]
        else:
            course_title, course_pool = "INTERVAL HISTORY:", lex["hpi_filler"]
        course_deck: list = []                    # the pool dealt in shuffled rounds: few repeats
        lab_share, flow_share, imaging_share = (0.35, 0.55, 0.62) if long else (0.2, 0.25, 0.32)
        while words < target:
            u = rand()
            if u < lab_share:
                line = self._lab_panel(rand, date)
                labs.append(line)
            elif u < flow_share:
                line = self._vitals(rand, None, f"{int(rand() * 24):02d}{pick(('00', '15', '30', '45'))}")
                flow.append(line)
            elif u < imaging_share:
                line = pick(lex["imaging"])
                imaging.append(line)
            else:
                if not course_deck:
                    course_deck = course_pool[:]
                    r.shuffle(course_deck)
                line = course_deck.pop()
                course.append(line)
            words += line.count(" ") + 1
        labs.sort(key=lambda line: line[6:10] + line[:5])        # panels in date order (MM/DD/YYYY ...)
        flow.sort()
        body = head
        for title, lines in ((course_title, course), ("LABORATORY DATA:", labs), ("IMAGING:", imaging),
                             ("VITALS FLOWSHEET:", flow)):
            if lines:
                body.append(title)
                body.extend(lines)
        body.extend(plan)
        return "\n".join(body)

    # -- Spark: Arrow batches of rows over a partition of patient indices --
    def _batches(self, batches, rows_of, schema: pa.Schema):
        rows: list[tuple] = []
        for batch in batches:
            for i in batch.column(0).to_pylist():
                rows.extend(rows_of(i))
                if len(rows) >= ARROW_BATCH_ROWS:
                    yield record_batch(rows, schema)
                    rows = []
        if rows:
            yield record_batch(rows, schema)

    def note_batches(self, batches):
        return self._batches(batches, self.note_rows, NOTES_ARROW)

    def diagnosis_batches(self, batches):
        return self._batches(batches, self.diagnosis_rows, DIAGNOSES_ARROW)
