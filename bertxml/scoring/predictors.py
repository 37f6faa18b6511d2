"""The predictors of model folders, by kind: `make_predict_fn(model_dir)` reads the manifest's model_kind
and returns `predict(texts) -> (n, M) float32` note probabilities in label_vocab.json order.

Model kinds: `PREDICTORS[manifest["model_kind"]]` is a factory `(model_dir, device, **options) -> predict`
with `predict(texts) -> (n, M) float32 probabilities`; "bertxml" and "cls" use `BertScorer`, and the
baselines plug in with `register_predictor(kind, factory)`. The registry depends on the engine
(`bertxml.scoring.engine`) and on the baselines' predictors (`bertxml.models`); neither depends on it.
"""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Callable

from bertxml.models import modeldir
from bertxml.models.modeldir import (CONFIG_FILE, WEIGHTS_FILE, ModelDirError, ModelInfo, find_latest_model,
                                     read_manifest)
from bertxml.scoring.engine import BertScorer, check_bert_dir


def find_model_dir(workdir: str | Path) -> Path:
    """The newest finished trained model under WORKDIR/models (`bertxml.models.modeldir.find_latest_model`)."""

    return find_latest_model(workdir)


def read_model_info(model_dir: str | Path, threshold_default: float = 0.5) -> ModelInfo:
    """`bertxml.models.modeldir.read_model_info` with this registry's kinds and kind-specific checks: raises
    ModelDirError for a folder no registered predictor can score."""
    return modeldir.read_model_info(model_dir, threshold_default, kinds=PREDICTORS, validators=VALIDATORS)


# ---- the registry of model kinds ----------------------------------------------------------------------------
def _bert_factory(model_dir, device=None, **options) -> BertScorer:
    return BertScorer(model_dir, device=device, **options)


PREDICTORS: dict[str, Callable] = {"bertxml": _bert_factory, "cls": _bert_factory}
VALIDATORS: dict[str, Callable[[ModelInfo], None]] = {"bertxml": check_bert_dir, "cls": check_bert_dir}


def register_predictor(kind: str, factory: Callable, validate: Callable[[ModelInfo], None] | None = None) -> None:
    """Plug a model kind in: `factory(model_dir, device, **options) -> predict(texts) -> (n, M) float32`.

    The factory may accept only the options it knows (see `make_predict_fn`); `validate(info)` may check
    the folder on the driver (raise ModelDirError) before any Spark task starts.
    """
    PREDICTORS[kind] = factory
    if validate is not None:
        VALIDATORS[kind] = validate


def baseline_predictor(model_dir, device=None, **options):
    """The factory for "logreg" and "bilstm" folders (options it does not use are ignored)."""
    # torch only where the model runs, not on the Spark driver (see bertxml.scoring.engine)
    from bertxml.models.bigru import BiGruPredictor
    from bertxml.models.logreg import LogRegPredictor

    kind = modeldir.load_manifest(model_dir).get("model_kind")
    cls = {"logreg": LogRegPredictor, "bilstm": BiGruPredictor}.get(kind)
    if cls is None:
        raise ValueError(f"{model_dir}: not a baseline folder (model_kind {kind!r})")
    known = ("batch_size", "num_threads", "threshold_default")
    return cls(model_dir, device, **{k: v for k, v in options.items() if k in known and v is not None})


def check_baseline_dir(info: ModelInfo) -> None:
    """Driver-side check of a baseline folder (no weights loaded): files present, and the weights' output
    size equal to label_vocab.json's number of codes. Raises ModelDirError."""
    _, shapes = modeldir.check_weights_folder(info, CONFIG_FILE, WEIGHTS_FILE)
    out = shapes.get("intercept") if info.model_kind == "logreg" else shapes.get("out.bias")
    if out is None or out[0] != info.n_labels:
        raise ModelDirError(f"{info.model_dir}: the weights' output layer has shape {out}, not {info.n_labels} labels")


for _kind in ("logreg", "bilstm"):  # the paper's baselines (bertxml.models.logreg, bertxml.models.bigru)
    register_predictor(_kind, baseline_predictor, check_baseline_dir)


def make_predict_fn(model_dir: str | Path, device: str | None = None, **options) -> Callable:
    """The predictor of a model folder, by its manifest's model_kind: `predict(texts) -> (n, M) float32`
    note-level probabilities, columns in label_vocab.json order. Plain Python: no Spark needed.

    options (batch_size, max_chunks_per_note, num_threads, cpu_bf16, threshold_default) go to the
    factory when its signature takes them.
    """
    kind = read_manifest(Path(model_dir)).get("model_kind")
    factory = PREDICTORS.get(kind)
    if factory is None:
        raise ModelDirError(f"{model_dir}: model_kind {kind!r} has no predictor; known kinds: {sorted(PREDICTORS)}")
    params = inspect.signature(factory).parameters
    takes_all = any(p.kind == p.VAR_KEYWORD for p in params.values())
    kwargs = {k: v for k, v in options.items() if takes_all or k in params}
    return factory(model_dir, device, **kwargs)
