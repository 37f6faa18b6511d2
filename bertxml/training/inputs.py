"""What a training run reads, resolved once on the driver into plain values a worker can receive
(`TrainInputs`): the Delta versions of labeled_notes, label_vocab and chunks pinned, the label vocabulary,
the tokenizer, the model folder to write, the training set's drift profile; and the readers a worker uses
(`load_split`) without a JVM. Pretraining, fine-tuning and the baselines all resolve their inputs here.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.compute as pc
from tokenizers import Tokenizer

from bertxml.config import CONF_DIR, Config
from bertxml.config_io import load_yaml
from bertxml.models import modeldir, profile
from bertxml.models.bert import HEADS, encoder_depth
from bertxml.platform import tables as t
from bertxml.platform.deltaread import latest_version, read_delta, table_path
from bertxml.text.data import ChunkSet, load_chunks
from bertxml.text.oov import load_reference_tokenizer
from bertxml.text.tokenize import chunk_notes
from bertxml.training.loop import CHECKPOINT_DIR

log = logging.getLogger("bertxml.training.inputs")


LABEL_INITS = ("description", "contextual", "random")  # model.label_init
ARCH_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")


@dataclass
class TrainInputs:
    """Everything a training process needs, resolved once on the driver (JSON-able)."""
    workdir: str
    out_dir: str
    model_version: str
    model_kind: str
    max_len: int
    labels: list                         # label_vocab rows in label_index order
    tokenizer_file: str
    versions: dict                       # {qualified table name: Delta version read}
    labeled_notes_path: str
    labeled_notes_version: int
    chunks_path: str | None = None       # None: notes are chunked here (an `init` checkpoint's own vocabulary)
    chunks_version: int | None = None
    encoder_dir: str | None = None
    init: str | None = None
    extra: dict = field(default_factory=dict)
    drift_profile: dict | None = None    # the training set's input statistics (bertxml.models.profile.training_profile)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainInputs":
        return cls(**data)


def size_label(arch: dict) -> str:
    """'tiny'/'small'/'big' when the architecture matches a conf/model preset, else e.g. 'h384-l6'."""
    for path in sorted((CONF_DIR / "model").glob("*.yaml")):
        preset = load_yaml(path)
        if all(preset.get(k) == arch.get(k) for k in ARCH_FIELDS):
            return path.stem
    return f"h{arch.get('hidden_size')}-l{arch.get('num_hidden_layers')}"


def init_tokenizer(init_dir: str | Path) -> Tokenizer:
    """The WordPiece tokenizer of an off-the-shelf BERT checkpoint folder (tokenizer.json, else vocab.txt
    as uncased BERT), with truncation and padding switched off: a Hub tokenizer.json often carries e.g.
    MiniLM's 128-token truncation, which would silently cut every note."""
    init_dir = Path(init_dir)
    if (init_dir / "tokenizer.json").exists():
        tokenizer = Tokenizer.from_file(str(init_dir / "tokenizer.json"))
    elif (init_dir / "vocab.txt").exists():
        tokenizer = load_reference_tokenizer(init_dir / "vocab.txt")
    else:
        raise FileNotFoundError(f"{init_dir} has neither tokenizer.json nor vocab.txt")
    tokenizer.no_truncation()
    tokenizer.no_padding()
    for token in ("[PAD]", "[CLS]", "[SEP]"):
        if tokenizer.token_to_id(token) is None:
            raise ValueError(f"the tokenizer of {init_dir} has no {token} token: not a BERT WordPiece vocabulary")
    return tokenizer


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def chunks_metadata(path: str | Path, version: int, max_len: int) -> dict | None:
    """userMetadata of the newest commit (at or before `version`) that wrote the chunks of this max_len:
    bertxml.text.tokenize records the tokenizer's sha256 there. Read from the Delta log JSON, no JVM."""
    log_dir = Path(path) / "_delta_log"
    for v in range(int(version), -1, -1):
        commit = log_dir / f"{v:020d}.json"
        if not commit.exists():
            return None  # older commits were cleaned up after a checkpoint
        for line in commit.read_text().splitlines():
            info = json.loads(line).get("commitInfo") if line.strip() else None
            if info and info.get("userMetadata"):
                try:
                    meta = json.loads(info["userMetadata"])
                except json.JSONDecodeError:
                    continue
                if meta.get("max_len") == max_len:
                    return meta
    return None


def etl_lineage(source, name: str, path: str | None, version: int | None) -> dict | None:
    """The ETL run that wrote this version of labeled_notes and what it read: {"run_id", "inputs": {"notes":
    {"source", "version", ...}, "diagnoses": {...}}}, from the lineage bertxml.etl.etl leaves in the commit's
    userMetadata (a Warehouse asks it; a workdir's Delta log is read as JSON, no JVM). None when the commit
    holds none (a table written by something else, or a commit file cleaned up after a checkpoint)."""
    if version is None:
        return None
    if hasattr(source, "spark"):
        meta = source.commit_metadata(name, version)
    else:
        commit = Path(path) / "_delta_log" / f"{int(version):020d}.json"
        infos = [json.loads(line).get("commitInfo") for line in commit.read_text().splitlines()
                 if line.strip()] if commit.exists() else []
        text = next((i.get("userMetadata") for i in infos if i and i.get("userMetadata")), None)
        try:
            meta = json.loads(text) if text else None
        except json.JSONDecodeError:
            meta = None
    if not isinstance(meta, dict) or not meta.get("run_id"):
        return None
    return {"run_id": meta["run_id"], "inputs": meta.get("inputs") or {}}


def source_tables(source, cfg: Config) -> dict:
    """{short: (qualified name, Delta folder, version)} for the tables training reads, from a Warehouse or a
    path-mode workdir. Path mode reads the latest versions from the Delta logs (no Spark job needed);
    a metastore warehouse asks Spark for versions and locations."""
    out = {}
    for short in (t.LABELED_NOTES, t.LABEL_VOCAB, t.CHUNKS):
        name = f"{cfg.warehouse.schema}.{short}"
        if hasattr(source, "spark") and not source.path_mode:
            version = source.version(name)
            path = source.spark.sql(f"DESCRIBE DETAIL {name}").first()["location"] if version is not None else None
        else:
            path = source.path(name) if hasattr(source, "spark") else table_path(source, cfg.warehouse.schema, short)
            version = latest_version(path) if (Path(path) / "_delta_log").exists() else None
        out[short] = (name, str(path) if version is not None else None, version)
    return out


def _read_label_vocab(source, name: str, path: str, version: int) -> list[dict]:
    if hasattr(source, "spark"):  # the driver's Spark, once; workers get the list
        rows = [r.asDict() for r in source.table(name, version=version).orderBy("label_index").collect()]
    else:
        rows = sorted(read_delta(path, version).to_pylist(), key=lambda r: r["label_index"])
    labels = [{k: row.get(k) for k in modeldir.LABEL_FIELDS} for row in rows]
    if [r["label_index"] for r in labels] != list(range(len(labels))):
        raise ValueError(f"{name} version {version}: label_index is not 0..{len(labels) - 1}")
    if not labels:
        raise ValueError(f"{name} version {version} is empty: lower etl.min_code_count or add notes")
    return labels


def unfinished_model_dir(workdir, model_kind: str) -> Path:
    """The newest folder under WORKDIR/models with a checkpoint and no manifest (a run that stopped)."""
    root = modeldir.models_root(workdir)
    candidates = [p.parent.parent for p in root.glob(f"{model_kind}-*/{CHECKPOINT_DIR}*/state.json")
                  if not (p.parent.parent / modeldir.MANIFEST_FILE).exists()]
    if not candidates:
        raise FileNotFoundError(f"no interrupted {model_kind} run to resume under {root}")
    return max(candidates, key=lambda p: p.stat().st_mtime)


def resolve_train_inputs(source, cfg: Config, model_kind: str = "bertxml", init: str | Path | None = None,
                         encoder_dir: str | Path | None = None, vocab_dir: str | Path | None = None,
                         out_dir: str | Path | None = None, resume: bool = False) -> TrainInputs:
    """Pin what a training run reads: table versions (now), the label vocabulary, the tokenizer, the
    output folder. `source` is a Warehouse (Spark on the driver) or a path-mode workdir (no JVM).

    Tokenizer: encoder_dir/tokenizer.json (our pretraining copies it there) or vocab_dir/tokenizer.json
    (default WORKDIR/vocab) with the chunks table; with `init`, the checkpoint's own vocabulary, and the
    notes of labeled_notes are chunked in the worker (bertxml.text.tokenize.chunk_notes) instead of read from
    the chunks table, which holds our vocabulary's ids.
    """
    if model_kind not in HEADS:
        raise ValueError(f"unknown model_kind {model_kind!r}; choose one of {HEADS}")
    if init and encoder_dir:
        raise ValueError("give either init (an off-the-shelf BERT) or encoder_dir (our pretraining), not both")
    workdir = Path(source.workdir if hasattr(source, "spark") else source).resolve()
    tables = source_tables(source, cfg)
    for short, (name, path, version) in tables.items():
        if version is None and not (short == t.CHUNKS and init):
            job = "tokenize" if short == t.CHUNKS else "etl"
            raise FileNotFoundError(f"table {name} does not exist: run `bertxml {job}` first")
    vocab_name, vocab_path, vocab_version = tables[t.LABEL_VOCAB]
    labels = _read_label_vocab(source, vocab_name, vocab_path, vocab_version)
    max_len = int(cfg.model.max_len)

    arch = {k: getattr(cfg.model, k) for k in ARCH_FIELDS}
    source_dir = Path(init or encoder_dir) if (init or encoder_dir) else None
    if source_dir is not None:
        if not (source_dir / "config.json").exists():
            raise FileNotFoundError(f"{source_dir} has no config.json: not a BERT checkpoint folder")
        arch = json.loads((source_dir / "config.json").read_text())
        arch["num_hidden_layers"] = encoder_depth(arch["num_hidden_layers"], cfg.model, source_dir)
    if resume and out_dir is None:
        out_dir = unfinished_model_dir(workdir, model_kind)
    if out_dir is None:
        version, out_dir = modeldir.new_model_dir(workdir, model_kind, size_label(arch))
    else:
        out_dir, version = Path(out_dir).resolve(), modeldir.model_version(model_kind, size_label(arch))
    out_dir.mkdir(parents=True, exist_ok=True)

    versions = {name: v for name, _, v in tables.values() if v is not None}
    notes_name, notes_path, notes_version = tables[t.LABELED_NOTES]
    inputs = TrainInputs(workdir=str(workdir), out_dir=str(out_dir), model_version=version, model_kind=model_kind,
                         max_len=max_len, labels=labels, tokenizer_file="", versions=versions,
                         labeled_notes_path=notes_path, labeled_notes_version=notes_version,
                         encoder_dir=str(encoder_dir) if encoder_dir else None, init=str(init) if init else None)
    meta = None
    if init:
        # The checkpoint's vocabulary, saved (no truncation) as the model's tokenizer.json for scoring.
        tokenizer_file = out_dir / modeldir.TOKENIZER_FILE
        init_tokenizer(init).save(str(tokenizer_file))
        inputs.tokenizer_file = str(tokenizer_file)
        versions.pop(tables[t.CHUNKS][0], None)
    else:
        candidates = ([Path(encoder_dir) / modeldir.TOKENIZER_FILE] if encoder_dir else []) + \
                     [Path(vocab_dir or workdir / "vocab") / modeldir.TOKENIZER_FILE]
        tokenizer_file = next((p for p in candidates if p.exists()), None)
        if tokenizer_file is None:
            raise FileNotFoundError(f"no tokenizer.json in {[str(p.parent) for p in candidates]}: "
                                    "run `bertxml vocab` first")
        inputs.tokenizer_file = str(tokenizer_file)
        _, inputs.chunks_path, inputs.chunks_version = tables[t.CHUNKS]
        meta = chunks_metadata(inputs.chunks_path, inputs.chunks_version, max_len)
        sha = file_sha256(tokenizer_file)
        if meta and meta.get("tokenizer_sha256") and meta["tokenizer_sha256"] != sha:
            raise ValueError(f"the chunks for max_len {max_len} were made with another tokenizer "
                             f"({meta['tokenizer_sha256'][:12]}) than {tokenizer_file} ({sha[:12]}): "
                             "run `bertxml tokenize` with this vocabulary")
    inputs.extra["tokenizer_sha256"] = file_sha256(inputs.tokenizer_file)
    # The training set's notes: the labeled_notes version the chunks were made from (tokenize records it),
    # or the one read here for an `init` checkpoint.
    trained_notes = notes_version
    if inputs.chunks_path and meta and meta.get("labeled_notes_version") is not None:
        trained_notes = int(meta["labeled_notes_version"])
        if trained_notes != notes_version:
            log.warning("the chunks for max_len %d were made from %s version %d, not its latest (%d): run "
                        "`bertxml tokenize` to train on the latest ETL", max_len, notes_name, trained_notes,
                        notes_version)
    lineage = etl_lineage(source, notes_name, notes_path, trained_notes)
    inputs.extra["etl_run"] = {**lineage, "labeled_notes_version": trained_notes} if lineage else None
    inputs.drift_profile = profile.training_profile(
        source, cfg, tokenizer_file=inputs.tokenizer_file, labeled_notes_path=notes_path,
        labeled_notes_version=trained_notes, codes=[row["code"] for row in labels], etl_run=lineage, max_len=max_len)
    read = {r.get("source"): r.get("version") for r in (lineage or {}).get("inputs", {}).values()}
    log.info("training inputs: %s; written by etl run %s from %s; %d labels; tokenizer %s; out %s", versions,
             (lineage or {}).get("run_id", "-"), read or "-", len(labels), inputs.tokenizer_file, out_dir)
    return inputs


def load_split(inputs: TrainInputs, split: str, tokenizer: Tokenizer) -> ChunkSet:
    """One split's chunks: from the chunks table at the pinned version, or (init checkpoints) chunked here
    from labeled_notes with the checkpoint's tokenizer."""
    if inputs.chunks_path:
        return ChunkSet.from_arrow(load_chunks(inputs.chunks_path, inputs.chunks_version, split, inputs.max_len))

    notes = read_delta(inputs.labeled_notes_path, inputs.labeled_notes_version,
                       columns=["note_id", "split", "text", "codes"])
    notes = notes.filter(pc.equal(notes["split"], split))
    code_index = {row["code"]: row["label_index"] for row in inputs.labels}
    label_ids = [sorted({code_index[c] for c in codes or [] if c in code_index})
                 for codes in notes["codes"].to_pylist()]
    chunks = chunk_notes(tokenizer, notes["text"].to_pylist(), inputs.max_len)
    return ChunkSet.from_notes(notes["note_id"].to_pylist(), chunks, label_ids)


def special_ids(tokenizer: Tokenizer) -> dict:
    """Ids of the BERT special tokens in this tokenizer (ours: 0-4; off-the-shelf BERT: 0, 100-103)."""
    return {name: tokenizer.token_to_id(token) for name, token in
            (("pad", "[PAD]"), ("unk", "[UNK]"), ("cls", "[CLS]"), ("sep", "[SEP]"), ("mask", "[MASK]"))}
