"""Views for analysts, (re)created in every session over the tables that exist.

- `bertxml.predicted_codes`: one row per note and predicted code, with the code's description,
  probability and band ('auto' | 'review'; long form of `bertxml.predictions`). Rows an earlier bertxml
  wrote, without bands, show 'review' and a null encounter_id.
- `bertxml.latest_auc`: the newest AUC report per model version and dataset.
"""
from __future__ import annotations

from bertxml.platform import tables as t

VIEWS = {
    "predicted_codes": ((t.PREDICTIONS, t.MODEL_LABELS), """
        SELECT p.note_id, p.encounter_id, p.note_date, p.code, l.description,
               element_at(p.probabilities, l.label_index + 1) AS probability,
               coalesce(p.band, 'review') AS band, p.model_version
        FROM (SELECT note_id, {encounter_id}, note_date, model_version, probabilities, code,
                     element_at({predicted_bands}, pos + 1) AS band
              FROM {schema}.predictions LATERAL VIEW posexplode(predicted_codes) c AS pos, code) p
        JOIN {schema}.model_labels l ON l.model_version = p.model_version AND l.code = p.code"""),
    "latest_auc": ((t.AUC_REPORT,), """
        SELECT * EXCEPT (rn) FROM (
          SELECT *, row_number() OVER (PARTITION BY model_version, dataset ORDER BY created_at DESC) AS rn
          FROM {schema}.auc_report) WHERE rn = 1"""),
}

# Columns a table an earlier bertxml wrote may lack (it gains them on its next write), as the views read them.
LATER_COLUMNS = {t.PREDICTIONS: {"encounter_id": "CAST(NULL AS STRING) AS encounter_id",
                                 "predicted_bands": "CAST(NULL AS ARRAY<STRING>)"}}


def _columns(warehouse, tables: list[str], needs) -> dict:
    """{column: SQL}: each later column of these tables, itself where the table has it, else its stand-in."""
    out = {}
    for table, short in zip(tables, needs):
        later = LATER_COLUMNS.get(short)
        if later:
            have = set(warehouse.table(table).columns)
            out.update({col: (col if col in have else sql) for col, sql in later.items()})
    return out


def create_views(warehouse) -> list[str]:
    """Create (or replace) each view whose tables exist; returns the views created."""
    schema = warehouse.cfg.warehouse.schema
    made = []
    for view, (needs, sql) in VIEWS.items():
        tables = [f"{schema}.{name}" for name in needs]
        if all(warehouse.exists(table) and table not in warehouse.hidden for table in tables):
            columns = _columns(warehouse, tables, needs)
            warehouse.spark.sql(f"CREATE OR REPLACE VIEW {schema}.{view} AS "
                                + sql.format(schema=schema, **columns))
            made.append(view)
    return made
