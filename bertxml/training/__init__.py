"""Fitting models: one loop toolkit (`loop`: optimizer groups, schedule, checkpoint and resume, DDP and
TorchDistributor, threads, the dev selection score), the training inputs pinned to Delta versions (`inputs`),
thresholds and operating points (`thresholds`), then `pretrain` (with its MLM/NSP batches), `train`
(fine-tuning BERT-XML) and `baselines`: each stands on the toolkit, none on another's private names. The
whole retraining from a snapshot runs evaluate too, so it lives one floor up (`bertxml.retrain`). It may
import the foundation, `bertxml.platform`, `bertxml.etl`, `bertxml.text`, `bertxml.models` and itself;
never scoring or reports."""
