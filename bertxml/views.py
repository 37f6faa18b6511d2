"""Views for analysts, (re)created in every session over the tables that exist.

- `bertxml.predicted_codes`: one row per note and predicted code, with the code's description and
  probability (long form of `bertxml.predictions`).
- `bertxml.latest_auc`: the newest AUC report per model version and dataset.
"""
from __future__ import annotations

from bertxml import tables as t

VIEWS = {
    "predicted_codes": ((t.PREDICTIONS, t.MODEL_LABELS), """
        SELECT p.note_id, p.note_date, p.code, l.description,
               element_at(p.probabilities, l.label_index + 1) AS probability, p.model_version
        FROM (SELECT note_id, note_date, model_version, probabilities, explode(predicted_codes) AS code
              FROM {schema}.predictions) p
        JOIN {schema}.model_labels l ON l.model_version = p.model_version AND l.code = p.code"""),
    "latest_auc": ((t.AUC_REPORT,), """
        SELECT * EXCEPT (rn) FROM (
          SELECT *, row_number() OVER (PARTITION BY model_version, dataset ORDER BY created_at DESC) AS rn
          FROM {schema}.auc_report) WHERE rn = 1"""),
}


def create_views(warehouse) -> list[str]:
    """Create (or replace) each view whose tables exist; returns the views created."""
    schema = warehouse.cfg.warehouse.schema
    made = []
    for view, (needs, sql) in VIEWS.items():
        tables = [f"{schema}.{name}" for name in needs]
        if all(warehouse.exists(table) and table not in warehouse.hidden for table in tables):
            warehouse.spark.sql(f"CREATE OR REPLACE VIEW {schema}.{view} AS " + sql.format(schema=schema))
            made.append(view)
    return made
