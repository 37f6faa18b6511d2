"""The nightly scorer: the engine (`engine`: a plain numpy -> numpy predict function, length bucketing, the
fused label-attention head, evidence spans), the Spark pandas UDF and its per-worker cache (`udf`), the nightly
job with its MERGE into `bertxml.predictions` (`score`), encounter roll-ups (`encounters`) and the nightly
drift job (`drift`). It may import `bertxml.config`, `bertxml.metrics`, `bertxml.platform`, `bertxml.etl`,
`bertxml.text`, `bertxml.models` and itself; never training or reports."""
