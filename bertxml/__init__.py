"""bertxml: BERT-XML automated ICD-10 coding of clinical notes, as Spark + Delta Lake jobs.

One subpackage per stage, imports going one way: `platform` (Spark, Delta, tables) <- `etl` and `text` <-
`models` <- `training` and `scoring` <- `reports`, all standing on the foundation (`config`, `config_io`,
`metrics`). The application on top runs the stages: `retrain`, `demo` and the command line (`cli`); `jobs/`
and the `bertxml` console command only wire it. tests/test_imports.py holds the order.
"""
__version__ = "0.1.0"
