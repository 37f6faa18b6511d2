"""The paper's section 4.1 as a Spark job: note rules and reject reasons, encounter codes, chronic imputation,
the train/dev/test split and the label vocabulary (`etl`), the ICD-10 reference (`icd`), and beside it the
synthetic warehouse generator (`generate`, with its code universe `lexicon`, its time span `span` and one
patient at a time `patients`). It may import the foundation (`bertxml.config`, `bertxml.config_io`,
`bertxml.metrics`), `bertxml.platform` and itself."""
