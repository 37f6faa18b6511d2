"""bertxml: BERT-XML automated ICD-10 coding of clinical notes, as Spark + Delta Lake jobs.

The library does the work; `jobs/` and the `bertxml` console command only wire it (see bertxml/cli.py).
"""
__version__ = "0.1.0"
