"""Model folders: what a trained model (or a pretrained encoder) leaves on disk, and how to find the newest.

A model folder, default WORKDIR/models/<model_version>, holds

    model.safetensors + model_config.json   weights and architecture (bertxml.models.bert.save_model); no pickle
    tokenizer.json                          the tokenizer the model was trained with (copied)
    label_vocab.json                        [{label_index, code, description, train_count, is_chronic}, ...]
    thresholds.json                         {code: threshold}, tuned on dev for maximum F1
    drift_profile.json                      the training set's input statistics and each code's rates, the
                                            reference of the nightly drift table (bertxml.scoring.drift); absent in
                                            folders trained before it was recorded
    operating_points.json                   per code from dev: the F1, auto-accept (precision target) and
                                            review (recall target) thresholds with the precision, recall
                                            and support measured there (bertxml.training.thresholds.operating_points);
                                            a folder without it scores every predicted code 'review'
    manifest.json                           {model_version, model_kind, code_version, created_at, config,
                                             inputs {table: Delta version}, max_len, dev_metrics,
                                             parameters, train_seconds, etl_run {run_id, inputs {notes,
                                             diagnoses: {source, version}}}}

`etl_run` names the ETL run that wrote the labeled_notes version trained on, and the Delta version of
each table it read: `bertxml retrain --as-of-run RUN_ID` rebuilds that training set.

An encoder folder from pretraining (WORKDIR/models/encoder-<size>-<timestamp>) holds the Hugging Face
checkpoint (config.json + model.safetensors), tokenizer.json and a manifest.json with model_kind "encoder".
"The newest trained model" is the folder whose manifest has the latest `created_at`.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open

import bertxml

log = logging.getLogger("bertxml.models.modeldir")

MANIFEST_FILE = "manifest.json"
WEIGHTS_FILE = "model.safetensors"     # every kind's weights (BERT and the baselines)
CONFIG_FILE = "model_config.json"      # every kind's architecture
TOKENIZER_FILE = "tokenizer.json"
LABEL_VOCAB_FILE = "label_vocab.json"
THRESHOLDS_FILE = "thresholds.json"
DRIFT_PROFILE_FILE = "drift_profile.json"
OPERATING_POINTS_FILE = "operating_points.json"
MANIFEST_KEYS = ("model_version", "model_kind", "code_version", "created_at", "config", "inputs", "max_len",
                 "dev_metrics", "parameters", "train_seconds")
ENCODER_KIND = "encoder"
LABEL_FIELDS = ("label_index", "code", "description", "train_count", "is_chronic")


def models_root(workdir: str | Path) -> Path:
    """WORKDIR/models: where model and encoder folders are written by default."""
    return Path(workdir).resolve() / "models"


def now_utc() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def model_version(prefix: str, size: str, when: dt.datetime | None = None) -> str:
    """'bertxml', 'tiny' -> 'bertxml-tiny-20261121T231500' (UTC, to the second)."""
    when = when or now_utc()
    return f"{prefix}-{size}-{when:%Y%m%dT%H%M%S}"


def new_model_dir(workdir: str | Path, prefix: str, size: str) -> tuple[str, Path]:
    """A fresh (version, folder) under WORKDIR/models; a suffix keeps two runs in the same second apart."""
    version = model_version(prefix, size)
    root = models_root(workdir)
    candidate, n = version, 1
    while (root / candidate).exists():
        n += 1
        candidate = f"{version}-{n}"
    return candidate, root / candidate


def git_commit(start: str | Path | None = None) -> str | None:
    """The checkout's commit, read from .git files (HEAD, refs, packed-refs) without running git; None when
    the code is not a git checkout (e.g. an installed wheel)."""
    here = Path(start or Path(__file__).resolve().parent)
    for folder in (here, *here.parents):
        git = folder / ".git"
        if not git.is_dir():
            continue
        try:
            head = (git / "HEAD").read_text().strip()
            if not head.startswith("ref:"):
                return head[:40] or None
            ref = head.partition(" ")[2].strip()
            if (git / ref).exists():
                return (git / ref).read_text().strip()[:40] or None
            packed = git / "packed-refs"
            if packed.exists():
                for line in packed.read_text().splitlines():
                    sha, _, name = line.partition(" ")
                    if name.strip() == ref:
                        return sha[:40]
        except OSError:
            return None
        return None
    return None


def code_version() -> str:
    """bertxml's version, plus '+g<commit>' when running from a git checkout."""
    commit = git_commit()
    return f"{bertxml.__version__}+g{commit[:12]}" if commit else bertxml.__version__


def write_json(path: Path, data) -> Path:
    """Write JSON atomically (a temp file renamed over the target): a crash never leaves half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str))
    tmp.replace(path)
    return path


def write_model_dir(out_dir: str | Path, *, model_version: str, model_kind: str, config: dict, inputs: dict,
                    max_len: int, dev_metrics: dict, parameters: int, train_seconds: float,
                    tokenizer_file: str | Path, label_vocab: list[dict] | None = None,
                    thresholds: dict | None = None, operating_points: dict | None = None,
                    extra: dict | None = None, drift_profile: dict | None = None) -> Path:
    """Complete a model folder whose weights are already saved: copy tokenizer.json, write label_vocab.json,
    thresholds.json, operating_points.json and drift_profile.json when given, and manifest.json LAST (its
    presence marks the folder as finished).

    `config` is the resolved Config.to_dict(); `inputs` maps table names to the Delta versions read.
    `extra` adds keys to the manifest (e.g. the encoder or checkpoint a model was initialised from).
    Returns out_dir as a Path.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if Path(tokenizer_file).resolve() != (out_dir / TOKENIZER_FILE).resolve():
        shutil.copyfile(tokenizer_file, out_dir / TOKENIZER_FILE)
    if label_vocab is not None:
        write_json(out_dir / LABEL_VOCAB_FILE, [{k: row.get(k) for k in LABEL_FIELDS} for row in label_vocab])
    if thresholds is not None:
        write_json(out_dir / THRESHOLDS_FILE, thresholds)
    if drift_profile is not None:
        write_json(out_dir / DRIFT_PROFILE_FILE, drift_profile)
    if operating_points is not None:
        write_json(out_dir / OPERATING_POINTS_FILE, operating_points)
    manifest = {
        "model_version": model_version,
        "model_kind": model_kind,
        "code_version": code_version(),
        "created_at": now_utc().isoformat(timespec="seconds"),
        "config": config,
        "inputs": inputs,
        "max_len": int(max_len),
        "dev_metrics": dev_metrics,
        "parameters": int(parameters),
        "train_seconds": round(float(train_seconds), 3),
    }
    manifest.update(extra or {})
    write_json(out_dir / MANIFEST_FILE, manifest)
    log.info("model folder %s written (%s, %s)", out_dir, model_kind, model_version)
    return out_dir


def load_manifest(model_dir: str | Path) -> dict:
    """manifest.json of a model or encoder folder; FileNotFoundError naming the folder when absent."""
    path = Path(model_dir) / MANIFEST_FILE
    if not path.exists():
        raise FileNotFoundError(f"{model_dir} has no {MANIFEST_FILE}: not a finished model folder")
    return json.loads(path.read_text())


def load_label_vocab(model_dir: str | Path) -> list[dict]:
    """label_vocab.json: one dict per code, in label_index order (the model's output order)."""
    return json.loads((Path(model_dir) / LABEL_VOCAB_FILE).read_text())


def load_thresholds(model_dir: str | Path) -> dict:
    """thresholds.json: {code: threshold}."""
    return json.loads((Path(model_dir) / THRESHOLDS_FILE).read_text())


def list_models(workdir: str | Path, kinds: tuple[str, ...] | None = None) -> list[tuple[str, Path, dict]]:
    """(created_at, folder, manifest) of every finished folder under WORKDIR/models, oldest first;
    `kinds` keeps only those model_kinds. Folders without a readable manifest (a run in progress) are skipped.
    """
    found = []
    root = models_root(workdir)
    for path in sorted(root.glob(f"*/{MANIFEST_FILE}")) if root.exists() else []:
        try:
            manifest = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            log.warning("skipping %s: unreadable manifest", path.parent)
            continue
        if kinds is not None and manifest.get("model_kind") not in kinds:
            continue
        found.append((str(manifest.get("created_at", "")), path.parent, manifest))
    return sorted(found, key=lambda item: (item[0], item[1].name))


def find_latest_model(workdir: str | Path, kinds: tuple[str, ...] | None = None) -> Path:
    """The newest finished model folder under WORKDIR/models (latest manifest created_at).

    By default every kind except pretrained encoders; `kinds=("encoder",)` finds the newest encoder.
    Raises FileNotFoundError when there is none.
    """
    models = [m for m in list_models(workdir, kinds) if kinds is not None or m[2].get("model_kind") != ENCODER_KIND]
    if not models:
        what = "/".join(kinds) if kinds else "trained model"
        raise FileNotFoundError(f"no {what} under {models_root(workdir)}: run `bertxml train` first")
    return models[-1][1]


# ---- a folder read and checked for scoring, without torch (safe on the driver) ------------------------------
class ModelDirError(ValueError):
    """A model folder that cannot be scored with: a missing file, or parts that disagree."""


def read_manifest(model_dir: Path) -> dict:
    """`load_manifest`, its errors as ModelDirError."""
    try:
        return load_manifest(model_dir)
    except FileNotFoundError as exc:
        raise ModelDirError(str(exc)) from None
    except json.JSONDecodeError as exc:
        raise ModelDirError(f"{model_dir}/manifest.json is not valid JSON: {exc}") from None


@dataclass(frozen=True)
class ModelInfo:
    """What the driver needs to know about a model folder: its identity and its label space.

    codes (M,) in label_index order, i.e. the order of `predictions.probabilities`; thresholds (M,) float32,
    per code, from thresholds.json (codes it lacks get `threshold_default`). From operating_points.json:
    auto_thresholds and review_thresholds (M,) float32, +inf where the code has none (too rare on dev, or
    a folder without the file), and points, the file's per-code dicts (None where absent).
    """

    model_dir: Path
    model_version: str
    model_kind: str
    max_len: int
    labels: tuple          # label_vocab.json rows (dicts), label_index order
    codes: tuple
    thresholds: np.ndarray
    auto_thresholds: np.ndarray = None
    review_thresholds: np.ndarray = None
    points: tuple = ()

    def __post_init__(self):
        none = np.full(len(self.codes), np.inf, dtype=np.float32)
        for name in ("auto_thresholds", "review_thresholds"):
            if getattr(self, name) is None:
                object.__setattr__(self, name, none)
        if not self.points:
            object.__setattr__(self, "points", (None,) * len(self.codes))

    @property
    def n_labels(self) -> int:
        return len(self.codes)

    @property
    def predict_thresholds(self) -> np.ndarray:
        """(M,) float32: a code is predicted when its probability reaches any of its thresholds (F1, review,
        auto), i.e. the lowest; it is 'auto' from auto_thresholds up, 'review' below."""
        return np.minimum(np.minimum(self.thresholds, self.review_thresholds), self.auto_thresholds)

    def label_rows(self) -> list[tuple]:
        """bertxml.model_labels rows (MODEL_LABELS_SCHEMA): the code, its F1 threshold and its operating
        points on dev (nulls where the folder has none)."""
        def at(point, key, field):
            value = (point or {}).get(key)
            return None if value is None or value.get(field) is None else float(value[field])

        rows = []
        for i, (code, row, point) in enumerate(zip(self.codes, self.labels, self.points)):
            support = None if point is None or point.get("support") is None else int(point["support"])
            rows.append((self.model_version, i, code, row.get("description"), float(self.thresholds[i]), support,
                         at(point, "f1", "precision"), at(point, "f1", "recall"),
                         *[at(point, key, field) for key in ("auto", "review")
                           for field in ("threshold", "precision", "recall")]))
        return rows


def read_model_info(model_dir: str | Path, threshold_default: float = 0.5, kinds=None, validators=None) -> ModelInfo:
    """Read and cross-check a model folder without loading its weights (no torch, no CUDA).

    kinds: the model kinds there is a predictor for (None: any); validators: {kind: check(info)}, the
    kind-specific checks (bertxml.scoring.predictors passes both).

    Raises ModelDirError when the manifest, label_vocab.json or a kind-specific file is missing or the
    parts disagree (label indices not 0..M-1, repeated codes, weights with another number of labels).
    """
    model_dir = Path(model_dir).resolve()
    if not model_dir.is_dir():
        raise ModelDirError(f"model folder {model_dir} does not exist")
    manifest = read_manifest(model_dir)
    kind = manifest.get("model_kind")
    if kinds is not None and kind not in kinds:
        raise ModelDirError(f"{model_dir}: model_kind {kind!r} has no predictor; known kinds: {sorted(kinds)}")
    vocab_path = model_dir / LABEL_VOCAB_FILE
    if not vocab_path.exists():
        raise ModelDirError(f"{model_dir} has no {LABEL_VOCAB_FILE}: cannot tell which code each output is")
    labels = sorted(json.loads(vocab_path.read_text()), key=lambda r: int(r["label_index"]))
    if [int(r["label_index"]) for r in labels] != list(range(len(labels))):
        raise ModelDirError(f"{vocab_path}: label_index values are not 0..{len(labels) - 1}")
    codes = tuple(str(r["code"]) for r in labels)
    if len(set(codes)) != len(codes) or not codes:
        raise ModelDirError(f"{vocab_path}: {len(codes)} codes, {len(set(codes))} distinct (need >= 1, no repeats)")
    thresholds = np.full(len(codes), threshold_default, dtype=np.float32)
    thr_path = model_dir / THRESHOLDS_FILE
    if thr_path.exists():
        tuned = json.loads(thr_path.read_text())
        unknown = sorted(set(tuned) - set(codes))
        if unknown:
            log.warning("%s: %d thresholds for codes outside the label vocabulary (ignored), e.g. %s",
                        thr_path, len(unknown), unknown[:3])
        for i, code in enumerate(codes):
            if code in tuned and tuned[code] is not None:
                thresholds[i] = float(tuned[code])
    else:
        log.warning("%s has no %s: every code uses threshold %.2f", model_dir, THRESHOLDS_FILE, threshold_default)
    max_len = int(manifest.get("max_len") or manifest.get("config", {}).get("model", {}).get("max_len") or 512)
    auto, review, points = _read_operating_points(model_dir, codes)
    info = ModelInfo(model_dir=model_dir, model_version=str(manifest.get("model_version") or model_dir.name),
                     model_kind=kind, max_len=max_len, labels=tuple(labels), codes=codes, thresholds=thresholds,
                     auto_thresholds=auto, review_thresholds=review, points=points)
    check = (validators or {}).get(kind)
    if check is not None:
        check(info)
    return info


def _read_operating_points(model_dir: Path, codes: tuple) -> tuple[np.ndarray, np.ndarray, tuple]:
    """operating_points.json -> (auto thresholds (M,), review thresholds (M,), per-code dicts); +inf and None
    for codes without them. A folder without the file (trained before bands existed) gives every predicted
    code 'review' at its F1 threshold."""
    auto = np.full(len(codes), np.inf, dtype=np.float32)
    review = np.full(len(codes), np.inf, dtype=np.float32)
    path = model_dir / OPERATING_POINTS_FILE
    if not path.exists():
        log.warning("%s has no %s: every predicted code is banded 'review'", model_dir, OPERATING_POINTS_FILE)
        return auto, review, (None,) * len(codes)
    try:
        per_code = json.loads(path.read_text())["codes"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ModelDirError(f"{path} is not an operating points file ({exc})") from None
    points = tuple(per_code.get(code) for code in codes)
    for i, point in enumerate(points):
        for key, out in (("auto", auto), ("review", review)):
            if point and point.get(key) and point[key].get("threshold") is not None:
                out[i] = float(point[key]["threshold"])
    return auto, review, points


def safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor name -> shape from a safetensors file's header, no tensor loaded."""
    try:
        with safe_open(str(path), framework="np") as f:
            return {name: f.get_slice(name).get_shape() for name in f.keys()}
    except SafetensorError as exc:
        raise ModelDirError(f"{path}: not a safetensors file ({exc})") from None


def check_weights_folder(info: ModelInfo, config_file: str, weights_file: str) -> tuple[dict, dict]:
    """Any model folder: tokenizer, config and weights present, and the config's n_labels equal to
    label_vocab.json's number of codes. Returns (config, {weight name: shape}) without loading weights."""
    d = info.model_dir
    for name in (TOKENIZER_FILE, config_file, weights_file):
        if not (d / name).exists():
            raise ModelDirError(f"{d} has no {name}")
    meta = json.loads((d / config_file).read_text())
    if int(meta.get("n_labels", -1)) != info.n_labels:
        raise ModelDirError(f"{d}: {LABEL_VOCAB_FILE} lists {info.n_labels} codes but {config_file} says the "
                            f"weights have {meta.get('n_labels')} labels: the folder mixes two label vocabularies")
    return meta, safetensors_shapes(d / weights_file)


@dataclass
class ScoredNotes:
    """The engine's output for n notes: probs (n, M) float32 (max over chunks), n_chunks (n,) chunks scored,
    n_tokens (n,) word pieces in the note (before any cut), truncated (n,) True when chunks were dropped;
    evidence: None when not asked for, else per note a list of {code, rank, char_start, char_end, weight}
    (see `BertScorer.score`)."""

    probs: np.ndarray
    n_chunks: np.ndarray
    n_tokens: np.ndarray
    truncated: np.ndarray
    evidence: list | None = None


# ---- probabilities -> the codes a coder sees (top codes, predicted codes and their review bands) ----------
BANDS = ("auto", "review")


def top_codes(probs: np.ndarray, codes: np.ndarray, k: int) -> list[list[dict]]:
    """Each row's k most probable codes, best first, as [{code, probability}]."""
    k = min(k, probs.shape[1])
    if k <= 0 or probs.shape[0] == 0:
        return [[] for _ in range(probs.shape[0])]
    part = np.argpartition(-probs, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(probs, part, axis=1), axis=1, kind="stable")
    best = np.take_along_axis(part, order, axis=1)  # (n, k)
    return [[{"code": codes[j], "probability": float(p[j])} for j in row] for p, row in zip(probs, best)]


def predicted_codes(probs: np.ndarray, codes: np.ndarray, thresholds: np.ndarray) -> list[list[str]]:
    """Each row's codes whose probability reaches the code's threshold (float32 comparison)."""
    hits = probs >= thresholds[None, :].astype(np.float32)
    return [codes[np.flatnonzero(row)].tolist() for row in hits]


def predicted_bands(probs: np.ndarray, info: ModelInfo) -> tuple[list[list[str]], list[list[str]]]:
    """Each row's predicted codes (reaching `info.predict_thresholds`) and, aligned with them, their bands:
    'auto' where the probability reaches the code's auto-accept threshold, else 'review'."""
    codes = np.array(info.codes, dtype=object)
    hits = probs >= info.predict_thresholds[None, :]
    auto = probs >= info.auto_thresholds[None, :]
    out_codes, out_bands = [], []
    for hit, sure in zip(hits, auto):
        idx = np.flatnonzero(hit)
        out_codes.append(codes[idx].tolist())
        out_bands.append(np.where(sure[idx], BANDS[0], BANDS[1]).tolist())
    return out_codes, out_bands
