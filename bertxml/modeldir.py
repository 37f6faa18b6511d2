"""Model folders: what a trained model (or a pretrained encoder) leaves on disk, and how to find the newest.

A model folder, default WORKDIR/models/<model_version>, holds

    model.safetensors + model_config.json   weights and architecture (bertxml.model.save_model); no pickle
    tokenizer.json                          the tokenizer the model was trained with (copied)
    label_vocab.json                        [{label_index, code, description, train_count, is_chronic}, ...]
    thresholds.json                         {code: threshold}, tuned on dev for maximum F1
    drift_profile.json                      the training set's input statistics and each code's rates, the
                                            reference of the nightly drift table (bertxml.drift); absent in
                                            folders trained before it was recorded
    operating_points.json                   per code from dev: the F1, auto-accept (precision target) and
                                            review (recall target) thresholds with the precision, recall
                                            and support measured there (bertxml.train.operating_points);
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
from pathlib import Path

import bertxml

log = logging.getLogger("bertxml.modeldir")

MANIFEST_FILE = "manifest.json"
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
