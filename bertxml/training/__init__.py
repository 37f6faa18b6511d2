"""Fitting models: one loop toolkit (`loop`: optimizer groups, schedule, checkpoint and resume, DDP and
TorchDistributor, threads), the training inputs pinned to Delta versions (`inputs`), thresholds and operating
points (`thresholds`), then `pretrain`, `train` (fine-tuning BERT-XML) and `baselines`: each stands on the
toolkit, none on another's private names. It may import `bertxml.config`, `bertxml.metrics`,
`bertxml.platform`, `bertxml.etl`, `bertxml.text`, `bertxml.models` and itself; never scoring or reports."""
