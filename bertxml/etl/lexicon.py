"""The synthetic warehouse's code universe: `n_codes` real ICD-10-CM codes with Zipf-like frequencies, a
curated core of common codes with abbreviations, synonyms and medication cues (resources/clinical_lexicon.yaml),
the rest random leaf codes named by their (sometimes shortened) descriptions (`code_catalog`).
"""
from __future__ import annotations

import math
import re
from functools import lru_cache
from importlib import resources

import numpy as np
import pandas as pd
import yaml

from bertxml.etl.icd import chronic_codes, icd10cm_descriptions

ZIPF_EXPONENT = 1.0              # code weight ~ 1 / rank: a few codes very common, hundreds rare


# ---- the code universe ----------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def load_lexicon() -> dict:
    """resources/clinical_lexicon.yaml: the curated core codes and the sentence pools."""
    text = resources.files("bertxml").joinpath("resources/clinical_lexicon.yaml").read_text(encoding="utf-8")
    return yaml.safe_load(text)


@lru_cache(maxsize=1)
def _leaf_codes() -> tuple[str, ...]:
    """Billable ICD-10-CM leaves in code order, without the external-cause chapter (V-Y) and, for injuries
    (S, T), only the initial encounter: the thousands of sequela/subsequent variants would crowd the tail."""
    # only when the catalogue needs codes beyond the lexicon's core: the import parses the ICD-10-CM XML (seconds)
    import simple_icd_10_cm as cm

    return tuple(sorted(c for c in icd10cm_descriptions() if c[0] not in "VWXY" and cm.is_leaf(c)
                        and not (c[0] in "ST" and len(c) == 8 and not c.endswith("A"))))


def description_forms(description: str, shorten_head: bool) -> list[str]:
    """How a note names a code by its description: lower-cased, then without parentheticals and
    'unspecified', then (for the random tail) only the part before the first comma."""
    full = description.lower()
    clean = re.sub(r"\s*\([^)]*\)", "", full)
    clean = re.sub(r"\bunspecified\b\s*", "", clean)
    clean = re.sub(r"\s*,\s*(,\s*)*", ", ", clean).strip(" ,")
    forms = [full]
    if clean and clean != full:
        forms.append(clean)
    head = clean.split(",")[0].strip()
    if shorten_head and head not in forms and len(head.split()) >= 2:
        forms.append(head)
    return forms


@lru_cache(maxsize=8)
def _catalog(n_codes: int, seed: int) -> pd.DataFrame:
    if n_codes < 1:
        raise ValueError(f"generate.n_codes must be at least 1, got {n_codes}")
    descriptions, chronic = icd10cm_descriptions(), chronic_codes()
    core = load_lexicon()["core_codes"]
    unknown = [e["code"] for e in core if e["code"] not in descriptions]
    if unknown:
        raise ValueError(f"clinical_lexicon.yaml names codes not in ICD-10-CM: {unknown}")
    rows = [dict(code=e["code"], is_core=True, abbreviations=list(e.get("abbr", [])),
                 synonyms=list(e.get("syn", [])), medications=list(e.get("meds", [])),
                 is_symptom=bool(e.get("symptom", False))) for e in core[:n_codes]]
    n_fill = n_codes - len(rows)
    if n_fill > 0:
        taken = {r["code"] for r in rows}
        pool = [c for c in _leaf_codes() if c not in taken]
        if n_fill > len(pool):
            raise ValueError(f"generate.n_codes={n_codes} is more than the {len(pool) + len(taken)} usable codes")
        # chapters drawn in proportion to the square root of their size, so injuries (S, T) and the
        # musculoskeletal chapter (M) do not fill most of the tail
        size = pd.Series([c[0] for c in pool]).value_counts()
        p = np.array([1.0 / math.sqrt(size[c[0]]) for c in pool])
        rng = np.random.default_rng([seed, 0, 0xCA7A])     # the catalogue's own stream, apart from patients'
        for k in rng.choice(len(pool), size=n_fill, replace=False, p=p / p.sum()):
            rows.append(dict(code=pool[k], is_core=False, abbreviations=[], synonyms=[], medications=[],
                             is_symptom=False))
    frame = pd.DataFrame(rows)
    frame.insert(1, "description", [descriptions[c] for c in frame["code"]])
    frame.insert(2, "is_chronic", [c in chronic for c in frame["code"]])
    weights = 1.0 / np.arange(1, len(frame) + 1) ** ZIPF_EXPONENT
    frame.insert(3, "weight", weights / weights.sum())
    frame["description_forms"] = [description_forms(d, not core_) for d, core_ in
                                  zip(frame["description"], frame["is_core"])]
    return frame


def code_catalog(n_codes: int, seed: int) -> pd.DataFrame:
    """The synthetic code universe, most frequent first.

    Columns: code (dotted ICD-10-CM), description, is_chronic (AHRQ CCI), weight (Zipf, sums to 1),
    is_core (curated), abbreviations, synonyms, medications (cues that imply the code), is_symptom,
    description_forms (how notes name it by description). Deterministic for (n_codes, seed).
    """
    return _catalog(n_codes, seed).copy()
