"""What a trained model is: BERT-XML read bottom-up (`bert`: label attention, heads, the ICD coding model),
its pre-training model (`pretraining`: masked LM + next sentence prediction), the paper's baselines
(`logreg`, `bigru`, `starspace`, and `baselines` for what they share: file names, the first-chunk rule, the
predictor base), model folders (`modeldir`), the drift reference profile a folder
carries (`profile`), the MLflow registry of model versions (`registry`, here because training logs to it and
scoring resolves from it), and where and in which precision a model runs (`devices`, `precision`). It may
import the foundation (`bertxml.config`, `bertxml.config_io`, `bertxml.metrics`), `bertxml.platform`,
`bertxml.text` and itself; never training, scoring or reports."""
