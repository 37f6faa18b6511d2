"""The MLflow tracking store and model registry: every trained model is a run and a registered version.

    bertxml promote VERSION --alias champion      # move an alias; who and when go to bertxml.job_runs
    bertxml score --model models:/bertxml@champion

`bertxml train`, `retrain` and `compare` log one MLflow run per model (`log_model_run`): the resolved config
as params, the dev metrics, the input Delta versions and the ETL run id as tags, and the model folder as
the artifact of an `mlflow.pyfunc` model (bertxml/resources/mlflow_model.py, logged as code) whose predict
takes note text and returns code probabilities through `bertxml.scoring.predictors.make_predict_fn`. The model is
registered as a new version of `mlflow.model_name` (default `bertxml`).

Stores: by default a SQLite file under WORKDIR/mlflow (mlflow.db, artifacts/), no server. On a cluster,
`mlflow.tracking_uri` / `mlflow.registry_uri` name the stores ("databricks", "databricks-uc" with a
three-part `mlflow.model_name`); nothing else changes. MLflow's telemetry is switched off before it is
imported, and the model is logged with its requirements stated, so logging never reaches the network.

Resolution (`resolve_model`): a `models:/NAME@ALIAS` or `models:/NAME/VERSION` URI becomes the model folder
inside the version's artifacts (used in place when the artifact store is a local folder, else downloaded
once per version to WORKDIR/mlflow/cache). With no model given, score/evaluate/explain use
`models:/<model_name>@<score.default_alias>` when a registry is configured and holds that alias, and the
newest folder under WORKDIR/models otherwise.
"""
from __future__ import annotations

import datetime as dt
import getpass
import logging
import os
import re
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import yaml

from bertxml import __version__
from bertxml.config import score_options
from bertxml.models.modeldir import find_latest_model, load_label_vocab, load_manifest
from bertxml.platform.runs import job_run

log = logging.getLogger("bertxml.models.registry")

MODELS_SCHEME = "models:/"
ARTIFACT_KEY = "model_dir"             # the model folder inside the pyfunc model's artifacts
PYFUNC_FILE = Path(__file__).resolve().parent.parent / "resources" / "mlflow_model.py"
# Set before mlflow is imported: no usage telemetry, no environment scan, no progress bars.
OFFLINE_ENV = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true",
               "MLFLOW_RECORD_ENV_VARS_IN_MODEL_LOGGING": "false",
               "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false", "GIT_PYTHON_REFRESH": "quiet"}
PARAM_VALUE_MAX = 500                  # MLflow's limit on a param value's length
_URI = re.compile(r"^models:/(?P<name>[^@/]+(?:\.[^@/]+)*)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")


class RegistryError(ValueError):
    """A model URI, alias or version the registry cannot resolve, or a bad registry setting."""


def is_model_uri(value) -> bool:
    return str(value or "").startswith(MODELS_SCHEME)


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """'models:/bertxml@champion' -> ('bertxml', 'champion', None); 'models:/bertxml/3' -> ('bertxml', None, '3')."""
    match = _URI.match(str(uri))
    if not match:
        raise RegistryError(f"{uri!r} is not a registered model URI: use models:/NAME@ALIAS or models:/NAME/VERSION")
    return match["name"], match["alias"], match["version"]


# ---- stores ------------------------------------------------------------------------------------------------
def store_dir(workdir) -> Path:
    """WORKDIR/mlflow: the embedded tracking store (mlflow.db) and its artifacts."""
    return Path(workdir).resolve() / "mlflow"


def tracking_uri(cfg, workdir) -> str:
    return cfg.mlflow.tracking_uri or f"sqlite:///{store_dir(workdir) / 'mlflow.db'}"


def registry_uri(cfg, workdir) -> str:
    return cfg.mlflow.registry_uri or tracking_uri(cfg, workdir)


def registry_configured(cfg, workdir) -> bool:
    """A registry to look an alias up in: one named in the config, or the embedded store already made."""
    return bool(cfg.mlflow.tracking_uri or cfg.mlflow.registry_uri) or (store_dir(workdir) / "mlflow.db").exists()


def _mlflow(cfg, workdir):
    """mlflow, imported offline and pointed at this config's stores (created under WORKDIR when embedded)."""
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    # mlflow only once OFFLINE_ENV is set, and only by a job that uses the registry: its import costs a
    # `--model FOLDER` night over a second (benchmarks/README.md, "The MLflow registry")
    import mlflow

    if not cfg.mlflow.tracking_uri:
        store_dir(workdir).mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(tracking_uri(cfg, workdir))
    mlflow.set_registry_uri(registry_uri(cfg, workdir))
    return mlflow


def client(cfg, workdir):
    """An MlflowClient on this config's tracking and registry stores."""
    mlflow = _mlflow(cfg, workdir)
    return mlflow.MlflowClient(tracking_uri=tracking_uri(cfg, workdir), registry_uri=registry_uri(cfg, workdir))


def experiment_id(cfg, workdir) -> str:
    """The experiment's id, created on first use (its artifacts under WORKDIR/mlflow/artifacts when embedded)."""
    c = client(cfg, workdir)
    found = c.get_experiment_by_name(cfg.mlflow.experiment)
    if found is not None:
        return found.experiment_id
    location = None if cfg.mlflow.tracking_uri else (store_dir(workdir) / "artifacts").as_uri()
    return c.create_experiment(cfg.mlflow.experiment, artifact_location=location)


# ---- logging a trained model -------------------------------------------------------------------------------
def flatten_config(config: dict, prefix: str = "") -> dict[str, str]:
    """{'train': {'lr': 1e-3}} -> {'train.lr': '0.001'}: the resolved config as MLflow params."""
    out = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten_config(value, f"{name}."))
        else:
            out[name] = str(value)[:PARAM_VALUE_MAX]
    return out


def dev_metric_values(dev_metrics: dict) -> dict[str, float]:
    """The numeric dev metrics of a manifest (micro/macro AUC, F1, counts), prefixed dev_; None left out."""
    return {f"dev_{k}": float(v) for k, v in (dev_metrics or {}).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v}


def run_tags(manifest: dict, job: str, job_run_id: str | None) -> dict[str, str]:
    """Lineage tags: the job and its run id, the model's identity, each input table's Delta version, and
    the ETL run (with the Delta version of each source it read) the training set came from."""
    tags = {"bertxml.job": job, "bertxml.model_version": str(manifest.get("model_version")),
            "bertxml.model_kind": str(manifest.get("model_kind")),
            "bertxml.code_version": str(manifest.get("code_version"))}
    if job_run_id:
        tags["bertxml.job_run_id"] = job_run_id
    for table, version in (manifest.get("inputs") or {}).items():
        tags[f"bertxml.input.{table}"] = str(version)
    etl = manifest.get("etl_run") or {}
    if etl.get("run_id"):
        tags["bertxml.etl_run_id"] = str(etl["run_id"])
    for source, read in (etl.get("inputs") or {}).items():
        if isinstance(read, dict):
            tags[f"bertxml.etl_input.{source}"] = f"{read.get('source')}@{read.get('version')}"
    return tags


def model_signature(n_labels: int):
    """Input: a `text` string column; output: (n, n_labels) float32 probabilities."""
    # mlflow only after `_mlflow` has set OFFLINE_ENV: log_model_run calls it first
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema, TensorSpec

    return ModelSignature(inputs=Schema([ColSpec("string", "text")]),
                          outputs=Schema([TensorSpec(np.dtype("float32"), (-1, n_labels))]))


@dataclass
class LoggedModel:
    """What `log_model_run` left: the MLflow run, and the registered version (None when not registered)."""
    run_id: str
    model_uri: str
    name: str
    version: str | None
    tags: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"mlflow_run_id": self.run_id, "model_uri": self.model_uri, "registered_model": self.name,
                "registered_version": self.version}


def log_model_run(cfg, workdir, model_dir, job: str, job_run_id: str | None = None, register: bool = True,
                  extra_tags: dict | None = None, extra_metrics: dict | None = None,
                  parent_run_id: str | None = None) -> LoggedModel:
    """One MLflow run for a finished model folder: params = the resolved config of its manifest, metrics =
    its dev metrics (plus `extra_metrics`), tags = its lineage (`run_tags`), and the pyfunc model with the
    folder as artifact, registered as a new version of cfg.mlflow.model_name when `register`.
    `parent_run_id` nests the run (a comparison's rows under the comparison). Returns a LoggedModel."""
    model_dir = Path(model_dir).resolve()
    manifest = load_manifest(model_dir)
    mlflow = _mlflow(cfg, workdir)
    exp = experiment_id(cfg, workdir)
    tags = {**run_tags(manifest, job, job_run_id), **(extra_tags or {})}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    n_labels = len(load_label_vocab(model_dir))
    options = {k: v for k, v in score_options(cfg.score).items() if v is not None}
    options["device"] = cfg.score.device
    with mlflow.start_run(experiment_id=exp, run_name=str(manifest.get("model_version")), tags=tags) as run:
        mlflow.log_params(flatten_config(manifest.get("config") or {}))
        mlflow.log_metrics({**dev_metric_values(manifest.get("dev_metrics")), **(extra_metrics or {})})
        for point in (manifest.get("dev_metrics") or {}).get("history") or []:
            step = int(point.get("step") or 0)
            mlflow.log_metrics({f"dev_history_{k}": float(point[k]) for k in ("macro_auc", "micro_auc")
                                if point.get(k) is not None}, step=step)
        with warnings.catch_warnings():  # no input example on purpose: it would load the model to run it
            warnings.filterwarnings("ignore", message=".*input example.*")
            info = mlflow.pyfunc.log_model(
                name="model", python_model=str(PYFUNC_FILE), artifacts={ARTIFACT_KEY: str(model_dir)},
                model_config=options, signature=model_signature(n_labels),
                pip_requirements=[f"bertxml=={__version__}"],  # stated, so nothing is inferred by importing
                registered_model_name=cfg.mlflow.model_name if register else None,
                metadata={"bertxml_model_version": str(manifest.get("model_version"))})
    version = str(info.registered_model_version) if register and info.registered_model_version else None
    if version:
        c = client(cfg, workdir)
        c.set_model_version_tag(cfg.mlflow.model_name, version, "bertxml.model_version",
                                str(manifest.get("model_version")))
        log.info("registered %s version %s (%s, MLflow run %s)", cfg.mlflow.model_name, version,
                 manifest.get("model_version"), run.info.run_id)
    return LoggedModel(run.info.run_id, info.model_uri, cfg.mlflow.model_name, version, tags)


def log_job_model(run, wh, cfg, model_dir, job: str, **kwargs) -> LoggedModel | None:
    """`log_model_run` for a job's model when cfg.mlflow.log_runs, its result in the job's record
    (outputs["mlflow"], counts registered_version). A registry failure fails the job: a model no one can
    find in the registry is not a finished training run."""
    if not cfg.mlflow.log_runs:
        return None
    logged = log_model_run(cfg, wh.workdir, model_dir, job, job_run_id=run.run_id, **kwargs)
    run.outputs.setdefault("mlflow", []).append(logged.to_dict())
    run.count("registered_version", logged.version)
    return logged


# ---- resolving a model -------------------------------------------------------------------------------------
@dataclass
class ResolvedModel:
    """A model to score with: its folder, and where it came from (uri, version, alias: None for a folder)."""
    model_dir: Path
    uri: str | None = None
    name: str | None = None
    version: str | None = None
    alias: str | None = None

    def to_dict(self) -> dict:
        out = {"dir": str(self.model_dir)}
        if self.uri:
            out.update(uri=self.uri, registered_model=self.name, registered_version=self.version)
            if self.alias:
                out["alias"] = self.alias
        return out


def model_version_of(c, uri: str):
    """The registry's ModelVersion for a models:/ URI; RegistryError naming what is missing."""
    # mlflow is already imported (offline) by the `client` c came from; see `_mlflow`
    from mlflow.exceptions import MlflowException

    name, alias, version = parse_model_uri(uri)
    try:
        return c.get_model_version_by_alias(name, alias) if alias else c.get_model_version(name, version)
    except MlflowException as exc:
        what = f"alias {alias!r}" if alias else f"version {version}"
        raise RegistryError(f"{uri}: the registry has no {what} of model {name!r} ({exc.error_code}); "
                            f"register one with `bertxml train`, point an alias at it with "
                            f"`bertxml promote VERSION --alias ALIAS`") from None


def artifact_folder(model_root: Path) -> Path:
    """The model folder inside a pyfunc model's folder, as its MLmodel file names it."""
    meta = yaml.safe_load((model_root / "MLmodel").read_text())
    try:
        relative = meta["flavors"]["python_function"]["artifacts"][ARTIFACT_KEY]["path"]
    except (KeyError, TypeError):
        raise RegistryError(f"{model_root}: not a bertxml model (its MLmodel has no {ARTIFACT_KEY!r} artifact)") from None
    return model_root / relative


def version_folder(cfg, workdir, c, name: str, version: str) -> Path:
    """The model folder of a registered version: in place when its artifacts are a local folder, else
    downloaded once to WORKDIR/mlflow/cache/NAME/VERSION."""
    source = c.get_model_version_download_uri(name, version)
    parsed = urlparse(source)
    if parsed.scheme in ("", "file") and (Path(unquote(parsed.path)) / "MLmodel").exists():
        return artifact_folder(Path(unquote(parsed.path)))
    cache = store_dir(workdir) / "cache" / name / str(version)
    if not cache.is_dir():
        import mlflow  # already imported offline by the `client` c came from (`_mlflow`)

        log.info("downloading %s version %s into %s", name, version, cache)
        tmp = cache.with_name(cache.name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(tmp),
                                            tracking_uri=tracking_uri(cfg, workdir))
        tmp.rename(cache)  # complete, or absent: a crash mid-download never leaves half a model
    found = sorted(cache.rglob("MLmodel"), key=lambda p: len(p.parts))
    if not found:
        raise RegistryError(f"{name} version {version}: no MLmodel in its artifacts ({source})")
    return artifact_folder(found[0].parent)


def resolve_model(cfg, workdir, model=None) -> ResolvedModel:
    """The model a scoring job uses: `model` (a folder or a models:/ URI), else cfg.score.model_dir, else
    the registry's `models:/<mlflow.model_name>@<score.default_alias>` where a registry is configured,
    else the newest folder under WORKDIR/models.

    An alias missing from a registry named in the config is an error (a production job must not fall back
    to whatever folder is newest); from the embedded store, the newest folder is used and logged."""
    model = model or cfg.score.model_dir or None
    if model is not None and not is_model_uri(model):
        return ResolvedModel(Path(model))
    if model is None:
        alias = cfg.score.default_alias
        if not alias or not registry_configured(cfg, workdir):
            return ResolvedModel(find_latest_model(workdir))
        model = f"{MODELS_SCHEME}{cfg.mlflow.model_name}@{alias}"
        explicit = bool(cfg.mlflow.tracking_uri or cfg.mlflow.registry_uri)
        try:
            return resolve_model(cfg, workdir, model)
        except RegistryError:
            if explicit:
                raise
            newest = find_latest_model(workdir)
            log.info("the embedded registry has no %s: scoring with the newest folder %s", model, newest)
            return ResolvedModel(newest)
    c = client(cfg, workdir)
    mv = model_version_of(c, model)
    name, alias, _ = parse_model_uri(model)
    folder = version_folder(cfg, workdir, c, name, str(mv.version))
    log.info("%s is version %s (%s)", model, mv.version, folder)
    return ResolvedModel(folder, uri=model, name=name, version=str(mv.version), alias=alias)


def registered_version_of(cfg, workdir, model_dir) -> str | None:
    """The newest registered version of cfg.mlflow.model_name made from this model folder (matched on its
    manifest's model_version), or None."""
    wanted = str(load_manifest(model_dir).get("model_version"))
    c = client(cfg, workdir)
    found = [mv for mv in c.search_model_versions(f"name = '{cfg.mlflow.model_name}'")
             if (mv.tags or {}).get("bertxml.model_version") == wanted]
    return str(max(int(mv.version) for mv in found)) if found else None


# ---- aliases -----------------------------------------------------------------------------------------------
def run_promote(wh, cfg, version, alias: str = "champion", model_name: str | None = None) -> dict:
    """Point `alias` of the registered model at `version` and record it in bertxml.job_runs (job
    'promote': the alias, the version, the version it moved from, who and when). Returns those counts."""
    # mlflow only here, where the registry is used: see `_mlflow`
    from mlflow.exceptions import MlflowException

    name = model_name or cfg.mlflow.model_name
    version = str(version).strip()
    if not version.isdigit():
        raise RegistryError(f"VERSION must be a registered version number, got {version!r}")
    if not alias or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_\-]*", alias) or alias.lower() == "latest":
        raise RegistryError(f"alias {alias!r}: letters, digits, _ and - only, starting with a letter; not 'latest'")
    with job_run(wh, "promote") as run:
        c = client(cfg, wh.workdir)
        try:
            mv = c.get_model_version(name, version)
        except MlflowException:
            raise RegistryError(f"model {name!r} has no version {version} in {registry_uri(cfg, wh.workdir)}") from None
        try:
            previous = str(c.get_model_version_by_alias(name, alias).version)
        except MlflowException:
            previous = None
        c.set_registered_model_alias(name, alias, version)
        run.inputs["registry"] = registry_uri(cfg, wh.workdir)
        run.outputs["alias"] = f"{MODELS_SCHEME}{name}@{alias}"
        for key, value in (("model_name", name), ("alias", alias), ("version", version),
                           ("previous_version", previous),
                           ("model_version", (mv.tags or {}).get("bertxml.model_version")),
                           ("promoted_by", _user()),
                           ("promoted_at", dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))):
            run.count(key, value)
        return {"run_id": run.run_id, **run.counts}


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (some containers)
        return str(os.getuid()) if hasattr(os, "getuid") else "unknown"
