"""The paper's section 4.1 as a Spark job: note rules and reject reasons, encounter codes, chronic imputation,
the train/dev/test split and the label vocabulary (`etl`), the ICD-10 reference (`icd`), and beside it the
synthetic warehouse generator (`generate`). It may import `bertxml.config`, `bertxml.platform` and itself."""
