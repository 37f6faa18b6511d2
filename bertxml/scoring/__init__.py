"""The nightly scorer: the engine (`engine`: a BERT folder as a plain numpy -> numpy predict function, length
bucketing, the fused label-attention head), the evidence spans it returns (`evidence`), the predictors of
each model kind (`predictors`: it depends on the engine and on the baselines, neither on it), the Spark
pandas UDF and its per-worker cache (`udf`), the nightly job with its replaceWhere into
`bertxml.predictions` (`score`), encounter roll-ups MERGEd into `bertxml.encounter_predictions`
(`encounters`) and the nightly drift job (`drift`). It may import the foundation, `bertxml.platform`,
`bertxml.etl`, `bertxml.text`, `bertxml.models` and itself; never training or reports."""
