"""The MLflow pyfunc model of a bertxml model folder, logged as code (MLflow "models from code"): no pickle.

`bertxml.models.registry.log_model_run` logs this file with the model folder as the artifact "model_dir";
`mlflow.pyfunc.load_model` / `mlflow.pyfunc.spark_udf` run it. `predict` takes note text (a DataFrame with
a `text` column, a Series or a list of strings) and returns (n, M) float32 code probabilities, columns in
the folder's label_vocab.json order, through `bertxml.scoring.predictors.make_predict_fn`: the engine of
`bertxml score`.
"""
import warnings

import mlflow
import numpy as np
import pandas as pd

from bertxml.models.devices import resolve_device
from bertxml.scoring.predictors import make_predict_fn

# predict takes a DataFrame, a Series or a list, checked by hand below; the signature states the schema.
warnings.filterwarnings("ignore", message=".*type hints to the `predict` method.*")


class IcdCodingModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        options = dict(context.model_config or {})
        device = resolve_device(options.pop("device", None))  # the Spark task's GPU, else CUDA, else CPU
        self.predict_fn = make_predict_fn(context.artifacts["model_dir"], device, **options)

    def predict(self, context, model_input, params=None):
        if isinstance(model_input, pd.DataFrame):
            if "text" not in model_input.columns:
                raise ValueError(f"the input needs a 'text' column; it has {list(model_input.columns)}")
            texts = model_input["text"].tolist()
        elif isinstance(model_input, pd.Series):
            texts = model_input.tolist()
        else:
            texts = list(model_input)
        return np.asarray(self.predict_fn(texts), dtype=np.float32)


mlflow.models.set_model(IcdCodingModel())
