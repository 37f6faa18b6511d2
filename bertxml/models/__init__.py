"""What a trained model is: BERT-XML read bottom-up (`bert`: label attention, heads, the task models), the
paper's baselines (`logreg`, `bigru`, `starspace`), model folders (`modeldir`), the drift reference profile a
folder carries (`profile`), the predictors that load a folder for scoring (`predictors`), the MLflow registry
(`registry`), and where and in which precision a model runs (`devices`, `precision`). It may import
`bertxml.config`, `bertxml.metrics`, `bertxml.platform`, `bertxml.text` and itself; never training, scoring or
reports."""
