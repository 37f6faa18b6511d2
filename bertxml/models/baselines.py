"""The paper's baselines (§3.4, §4.3): logistic regression on a bag of WordPieces, and a bidirectional GRU with
multi-head attention (eq. 5-8) over frozen StarSpace embeddings. Each is a model folder that `bertxml score`
and `bertxml evaluate` use exactly like a BERT one.

    bertxml train --model logreg|bilstm [--out DIR]        # one baseline, into WORKDIR/models
    bertxml compare                                        # the baselines beside the BERT rows

Inputs are pinned as `bertxml.training.train` pins them (`resolve_train_inputs`): the same Delta versions of
labeled_notes, label_vocab and chunks, the same label vocabulary and tokenizer, so a baseline and a BERT
model trained together see the same notes, labels and splits. Every baseline reads a note's FIRST
`baseline.max_len` tokens (paper §4.3: "All baseline models use a max input length of 512 tokens"): chunk 0
of `bertxml.chunks`, and at scoring time the first chunk of the same chunking (`bertxml.text.tokenize`), so a
longer note is scored on its start and flagged `truncated`.

- logreg (§3.4.1): sparse bag of WordPiece ids of the first chunk (special tokens left out), sublinear
  tf x idf with L2-normalised rows (or raw counts), and one L2 logistic regression per code
  (scikit-learn's liblinear: one-vs-rest over the label vocabulary). A train split larger than
  `baseline.logreg_max_train_notes` is fit on a seeded uniform sample of that many notes (only the sample's
  chunks are read); the manifest records the sample. Weights: coef (M, V), intercept (M,), idf (V,) as
  safetensors; prediction is sigmoid(x W^T + b) in NumPy, no scikit-learn object is kept (no pickle).
- bilstm (§3.4.2, §4.3): input embeddings trained first on the train notes with their codes as labels in
  the StarSpace manner (TagSpace mode: a note's mean WordPiece embedding against its codes' embeddings,
  dot similarity, softmax loss), then frozen; dropout 0.1 on them; one bidirectional GRU layer; K heads
  with learned queries q_k, a_ik = softmax_i <h_i, q_k> over the non-padding tokens (eq. 5), per-head
  context c_k = sum_i a_ik h_i / sqrt(d_h) (eq. 6, d_h = 2 x hidden: h_i concatenates both directions),
  c = [c_0 .. c_K] (eq. 7), y = sigmoid(W_a c + b) (eq. 8; the bias starts at each code's train
  log-odds). Binary cross-entropy, AdamW, the best dev macro AUC epoch kept.

Both tune per-code thresholds on dev for maximum F1 (`bertxml.training.train.tune_thresholds`) and write
model.safetensors + model_config.json, tokenizer.json, label_vocab.json, thresholds.json and manifest.json
(`bertxml.models.modeldir.write_model_dir`; model_kind "logreg" | "bilstm").
"""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bertxml.models import modeldir
from bertxml.config import Config, config_from_dict
from bertxml.metrics import auc_metrics, micro_f1
from bertxml.training.train import fmt_metric

log = logging.getLogger("bertxml.models.baselines")

KINDS = ("logreg", "bilstm")
WEIGHTS_FILE = "model.safetensors"     # the same names as a BERT folder (bertxml.models.bert)
CONFIG_FILE = "model_config.json"


# ---------------------------------------------------------------------------------------------------------
# Inputs: the same pins as bertxml.training.train, each note's first chunk


def _chunk_table(inputs):
    """(path, version) of the pinned chunks table."""
    if not inputs.chunks_path:
        raise ValueError("the baselines read bertxml.chunks: no chunks table in these inputs")
    return inputs.chunks_path, inputs.chunks_version


def load_first_chunks(inputs, split: str, max_notes: int = 0, seed: int = 0):
    """Chunk 0 of every note of `split` (at most `max_notes` notes, a seeded uniform sample, when > 0) from
    the pinned chunks table, as a ChunkSet (one chunk a note) and the number of notes in the split."""
    import pyarrow.compute as pc

    from bertxml.text.data import ChunkSet
    from bertxml.platform.deltaread import read_delta

    path, version = _chunk_table(inputs)
    wanted = {"max_len": int(inputs.max_len), "split": split, "chunk_index": 0}
    ids = read_delta(path, version, columns=["note_id"], filter=wanted)["note_id"]
    ids = pc.take(ids, pc.sort_indices(ids))  # the engine's row order varies; the seeded sample must not
    total = len(ids)
    columns = ["note_id", "chunk_index", "input_ids", "label_ids"]
    if max_notes and total > max_notes:
        keep = np.sort(np.random.default_rng(seed).choice(total, size=max_notes, replace=False))
        sample = pc.take(ids, keep).to_pylist()
        table = read_delta(path, version, columns=columns, filter={**wanted, "note_id": sample})
        log.info("%s: a sample of %d of %d notes (baseline.logreg_max_train_notes, seed %d)",
                 split, max_notes, total, seed)
    else:
        table = read_delta(path, version, columns=columns, filter=wanted)
    if table.num_rows == 0 and split == "train":
        raise ValueError(f"{path} (version {version}) has no train chunks with max_len {inputs.max_len}: "
                         f"run `bertxml tokenize --max-len {inputs.max_len}` first")
    return ChunkSet.from_arrow(table), total


def first_chunks(tokenizer, texts: list, max_len: int) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """Texts -> (the first chunk `[CLS] piece [SEP]` of each, as int64 arrays; word pieces per note (of the
    text read); truncated: the note is longer than its first chunk). The scorer's chunking
    (`bertxml.text.tokenize.encode_notes`, as bertxml.chunks), so training and scoring see the same tokens."""
    from bertxml.text.tokenize import encode_notes

    notes, n_tokens, truncated = encode_notes(tokenizer, texts, max_len, max_chunks=1)
    return [np.asarray(chunks[0], dtype=np.int64) for chunks in notes], n_tokens, truncated


def resolve_baseline_inputs(source, cfg: Config, model_kind: str, vocab_dir=None, out_dir=None):
    """`bertxml.training.train.resolve_train_inputs` for a baseline: the same pinned tables, label vocabulary and
    tokenizer, chunks of cfg.baseline.max_len, and a model folder named <kind>-<size>-<time>."""
    from bertxml.training.train import resolve_train_inputs

    if model_kind not in KINDS:
        raise ValueError(f"unknown baseline {model_kind!r}; choose one of {KINDS}")
    workdir = source.workdir if hasattr(source, "spark") else Path(source)
    size = "bow" if model_kind == "logreg" else f"h{cfg.baseline.bilstm_hidden_size}-k{cfg.baseline.bilstm_heads}"
    if out_dir is None:
        version, out_dir = modeldir.new_model_dir(workdir, model_kind, size)
    else:
        version = modeldir.model_version(model_kind, size)
    pinned = config_from_dict(cfg.to_dict())
    pinned.model.max_len = int(cfg.baseline.max_len)
    # The pins do not depend on the head: resolve as for a [CLS] model, then name the kind.
    inputs = resolve_train_inputs(source, pinned, "cls", vocab_dir=vocab_dir, out_dir=out_dir)
    inputs.model_kind, inputs.model_version = model_kind, version
    return inputs


def _special_ids(tokenizer) -> list[int]:
    """Ids of [PAD], [CLS], [SEP], [MASK]: they carry no word. [UNK] does (an unknown word) and is kept."""
    ids = (tokenizer.token_to_id(tok) for tok in ("[PAD]", "[CLS]", "[SEP]", "[MASK]"))
    return sorted(i for i in ids if i is not None)


# ---------------------------------------------------------------------------------------------------------
# Logistic regression on a bag of WordPieces (§3.4.1)


def bag_of_words(token_ids: list[np.ndarray], vocab_size: int, skip_ids=()):
    """Token id arrays -> sparse counts (n, V) float32 (CSR); `skip_ids` (special tokens) are not counted."""
    import scipy.sparse as sp

    skip = np.asarray(sorted(skip_ids), dtype=np.int64)
    rows, cols = [], []
    for i, ids in enumerate(token_ids):
        ids = np.asarray(ids, dtype=np.int64)
        ids = ids[(ids >= 0) & (ids < vocab_size) & ~np.isin(ids, skip)]
        rows.append(np.full(len(ids), i, dtype=np.int64))
        cols.append(ids)
    row = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
    col = np.concatenate(cols) if cols else np.zeros(0, dtype=np.int64)
    counts = sp.csr_matrix((np.ones(len(row), dtype=np.float32), (row, col)), shape=(len(token_ids), vocab_size))
    counts.sum_duplicates()
    return counts


def idf_weights(counts) -> np.ndarray:
    """Smoothed inverse document frequency (V,) of a counts matrix: log((1 + n) / (1 + df)) + 1."""
    n = counts.shape[0]
    df = np.bincount(counts.indices, minlength=counts.shape[1]).astype(np.float64)
    return (np.log((1.0 + n) / (1.0 + df)) + 1.0).astype(np.float32)


def weight_features(counts, idf: np.ndarray | None):
    """Counts -> the model's features: with idf, sublinear tf (1 + log tf) x idf and L2-normalised rows;
    without, the counts themselves."""
    if idf is None:
        return counts
    x = counts.copy()
    x.data = (1.0 + np.log(x.data)) * idf[x.indices]
    norms = np.sqrt(np.asarray(x.multiply(x).sum(axis=1)).ravel())
    norms[norms == 0] = 1.0
    x.data /= np.repeat(norms, np.diff(x.indptr)).astype(np.float32)
    return x.astype(np.float32)


def fit_one_vs_rest(x, labels: np.ndarray, c: float, max_iter: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """One L2 logistic regression per code (scikit-learn, liblinear) on features x (n, V) and labels (n, M).
    Returns coef (M, V) and intercept (M,) float32. A code with no positive (or no negative) note in x
    gets a constant: zero weights and the log-odds of its (smoothed) train frequency."""
    from sklearn.linear_model import LogisticRegression

    n, m = labels.shape
    coef = np.zeros((m, x.shape[1]), dtype=np.float32)
    intercept = np.zeros(m, dtype=np.float32)
    for j in range(m):
        y = labels[:, j] > 0
        positives = int(y.sum())
        if positives == 0 or positives == n:
            p = (positives + 0.5) / (n + 1.0)
            intercept[j] = math.log(p / (1 - p))
            continue
        clf = LogisticRegression(C=c, solver="liblinear", max_iter=max_iter, random_state=seed)
        clf.fit(x, y.astype(np.int64))
        coef[j], intercept[j] = clf.coef_[0], clf.intercept_[0]
    return coef, intercept


def logreg_probabilities(x, coef: np.ndarray, intercept: np.ndarray) -> np.ndarray:
    """sigmoid(x W^T + b): (n, V) sparse x, (M, V) W, (M,) b -> (n, M) float32."""
    logits = np.asarray(x @ coef.T, dtype=np.float32) + intercept[None, :]
    return (1.0 / (1.0 + np.exp(-np.clip(logits, -60, 60)))).astype(np.float32)


def train_logreg(inputs, cfg: Config) -> Path:
    """Fit the bag-of-words logistic regression on inputs' train split (or its sample), tune thresholds on
    dev, write the model folder. Returns it."""
    from tokenizers import Tokenizer

    bc = cfg.baseline
    out_dir = Path(inputs.out_dir)
    tokenizer = Tokenizer.from_file(inputs.tokenizer_file)
    vocab_size, m = tokenizer.get_vocab_size(), len(inputs.labels)
    skip = _special_ids(tokenizer)
    train_set, n_train = load_first_chunks(inputs, "train", bc.logreg_max_train_notes, bc.seed)
    dev_set, _ = load_first_chunks(inputs, "dev")
    log.info("logreg: %d train notes (of %d), %d dev notes, %d labels, %d features, first %d tokens",
             train_set.n_notes, n_train, dev_set.n_notes, m, vocab_size, inputs.max_len)
    started = time.perf_counter()
    counts = bag_of_words(train_set.input_ids, vocab_size, skip)
    idf = idf_weights(counts) if bc.logreg_tfidf else None
    coef, intercept = fit_one_vs_rest(weight_features(counts, idf), train_set.note_labels(m), bc.logreg_c,
                                      bc.logreg_max_iter, bc.seed)
    seconds = time.perf_counter() - started

    import safetensors.numpy

    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {"coef": coef, "intercept": intercept}
    if idf is not None:
        tensors["idf"] = idf
    safetensors.numpy.save_file(tensors, str(out_dir / WEIGHTS_FILE))
    arch = {"model_kind": "logreg", "n_labels": m, "vocab_size": vocab_size, "max_len": inputs.max_len,
            "tfidf": bool(bc.logreg_tfidf), "skip_ids": skip, "c": bc.logreg_c}
    modeldir.write_json(out_dir / CONFIG_FILE, arch)

    dev_probs = None
    if dev_set.n_notes:
        dev_probs = logreg_probabilities(weight_features(bag_of_words(dev_set.input_ids, vocab_size, skip), idf),
                                         coef, intercept)
    extra = {"train_notes": train_set.n_notes, "train_notes_in_split": n_train,
             "train_sample_seed": bc.seed if train_set.n_notes < n_train else None,
             "nonzero_weights": int(np.count_nonzero(coef))}
    return _finish(out_dir, inputs, cfg, dev_probs, dev_set, coef.size + intercept.size, seconds, extra)


def _finish(out_dir: Path, inputs, cfg: Config, dev_probs, dev_set, parameters: int, seconds: float,
            extra: dict) -> Path:
    """Dev thresholds, operating points and metrics, then modeldir.write_model_dir (tokenizer, labels,
    thresholds, operating points, drift profile, manifest)."""
    from bertxml.scoring.drift import add_dev_reference
    from bertxml.training.train import operating_points, tune_thresholds

    codes = [row["code"] for row in inputs.labels]
    thresholds = np.full(len(codes), cfg.score.threshold_default, dtype=np.float32)
    dev_metrics: dict = {"notes": 0}
    points = None
    if dev_probs is not None:
        labels = dev_set.note_labels(len(codes))
        thresholds = tune_thresholds(dev_probs, labels, cfg.score.threshold_default)
        points = operating_points(dev_probs, labels, codes, thresholds, cfg.bands.auto_precision,
                                  cfg.bands.review_recall, cfg.bands.min_support)
        dev_metrics = {**auc_metrics(dev_probs, labels), "micro_f1": micro_f1(dev_probs, labels, thresholds)}
    dev_metrics.update(extra.pop("dev_extra", {}))
    saved = config_from_dict(cfg.to_dict())
    saved.model.max_len = inputs.max_len
    modeldir.write_model_dir(out_dir, model_version=inputs.model_version, model_kind=inputs.model_kind,
                             config=saved.to_dict(), inputs=inputs.versions, max_len=inputs.max_len,
                             dev_metrics=dev_metrics, parameters=parameters, train_seconds=seconds,
                             tokenizer_file=inputs.tokenizer_file, label_vocab=inputs.labels,
                             thresholds={c: float(th) for c, th in zip(codes, thresholds)},
                             operating_points=points,
                             extra={**extra, "tokenizer_sha256": inputs.extra.get("tokenizer_sha256"),
                                    "etl_run": inputs.extra.get("etl_run")},
                             drift_profile=add_dev_reference(inputs.drift_profile, codes, dev_probs, thresholds))
    log.info("%s %s: dev macro AUC %s, micro AUC %s -> %s", inputs.model_kind, inputs.model_version,
             fmt_metric(dev_metrics.get("macro_auc")), fmt_metric(dev_metrics.get("micro_auc")), out_dir)
    return out_dir


# ---------------------------------------------------------------------------------------------------------
# BiGRU with multi-head attention (§3.4.2), read bottom-up: the attention, then the model


class MultiHeadAttentionPool(nn.Module):
    """Paper eq. 5-7: K learned queries q_k attend over the token states; padding gets exactly zero weight.

    states (B, T, D), attention_mask (B, T) 1 = token, 0 = padding -> context (B, K * D), attention (B, K, T).
    """

    def __init__(self, state_size: int, heads: int):
        super().__init__()
        self.state_size, self.heads = state_size, heads
        # randomly initialised (paper); 1/sqrt(D) keeps the first scores <h_i, q_k> of order 1
        self.queries = nn.Parameter(torch.randn(heads, state_size) / math.sqrt(state_size))  # (K, D)

    def forward(self, states: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = torch.einsum("btd,kd->bkt", states.float(), self.queries.float())  # (B, K, T) eq. 5 logits
        keep = attention_mask[:, None, :] != 0  # (B, 1, T)
        scores = scores.masked_fill(~keep, float("-inf"))
        attention = torch.softmax(scores, dim=-1)  # (B, K, T); exp(-inf) = 0 on padding
        context = torch.einsum("bkt,btd->bkd", attention, states.float()) / math.sqrt(self.state_size)  # eq. 6
        return context.reshape(states.shape[0], -1).to(states.dtype), attention  # (B, K * D) eq. 7


def reverse_padded(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Reverse the first lengths[b] positions of each row of x (B, T, ...); padding positions stay put."""
    t = x.shape[1]
    position = torch.arange(t, device=x.device)[None, :]  # (1, T)
    source = lengths[:, None].to(x.device) - 1 - position  # (B, T)
    source = torch.where(source >= 0, source, position.expand_as(source))
    return x.gather(1, source.reshape(*source.shape, *([1] * (x.dim() - 2))).expand_as(x))


class BiGruAttention(nn.Module):
    """The multi-head attention baseline: frozen embeddings -> dropout -> 1-layer BiGRU -> K-head attention
    -> one output layer (eq. 8). forward(input_ids (B, T), attention_mask (B, T), labels (B, M) or None,
    return_attention) -> {"logits" (B, M), "loss" (BCE, when labels), "attention" (B, K, T) when asked}."""

    def __init__(self, vocab_size: int, embed_dim: int, hidden_size: int, heads: int, n_labels: int,
                 dropout: float = 0.1, pad_id: int = 0):
        super().__init__()
        self.config = {"model_kind": "bilstm", "vocab_size": vocab_size, "embed_dim": embed_dim,
                       "hidden_size": hidden_size, "heads": heads, "n_labels": n_labels, "dropout": dropout,
                       "pad_id": pad_id}
        self.n_labels, self.pad_id = n_labels, pad_id
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=pad_id)
        self.embed.weight.requires_grad_(False)  # trained beforehand (StarSpace) and frozen (paper §4.3)
        self.dropout = nn.Dropout(dropout)
        # one bidirectional GRU layer, as two directions: the backward one reads each row reversed within its
        # length (`reverse_padded`), so it starts at the row's last real token. (Same function as nn.GRU on a
        # packed sequence, whose CPU backward pass is quadratic in the length: 30x slower at 512 tokens.)
        self.gru_forward = nn.GRU(embed_dim, hidden_size, batch_first=True)
        self.gru_backward = nn.GRU(embed_dim, hidden_size, batch_first=True)
        self.attention = MultiHeadAttentionPool(2 * hidden_size, heads)
        self.out = nn.Linear(heads * 2 * hidden_size, n_labels)  # W_a (M, K * d_h), eq. 8

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None = None,
                return_attention: bool = False) -> dict:
        lengths = attention_mask.sum(dim=1).clamp(min=1)  # (B,)
        x = self.dropout(self.embed(input_ids))  # (B, T, E)
        ahead, _ = self.gru_forward(x)  # (B, T, H); padding comes after the real tokens: they are unaffected
        behind, _ = self.gru_backward(reverse_padded(x, lengths))  # (B, T, H) over each row reversed
        states = torch.cat([ahead, reverse_padded(behind, lengths)], dim=-1)  # (B, T, 2H) h_i, both directions
        context, attention = self.attention(states, attention_mask)  # (B, K * 2H), (B, K, T)
        logits = self.out(context)  # (B, M)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.binary_cross_entropy_with_logits(logits.float(), labels.float())
        if return_attention:
            out["attention"] = attention
        return out


def save_bilstm(model: BiGruAttention, out_dir: Path, max_len: int) -> None:
    """model.safetensors (the frozen embeddings included) + model_config.json."""
    import safetensors.torch

    out_dir.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_model(model, str(out_dir / WEIGHTS_FILE))
    modeldir.write_json(out_dir / CONFIG_FILE, {**model.config, "max_len": int(max_len)})


def load_bilstm(model_dir: str | Path, device="cpu") -> BiGruAttention:
    import safetensors.torch

    arch = json.loads((Path(model_dir) / CONFIG_FILE).read_text())
    model = BiGruAttention(arch["vocab_size"], arch["embed_dim"], arch["hidden_size"], arch["heads"],
                           arch["n_labels"], arch["dropout"], arch["pad_id"])
    safetensors.torch.load_model(model, str(Path(model_dir) / WEIGHTS_FILE), strict=True, device=str(device))
    return model.to(device).eval()


# ---- StarSpace input embeddings (§4.3) ----------------------------------------------------------------------
def train_starspace(docs: list[np.ndarray], labels: list[np.ndarray], vocab_size: int, n_labels: int, dim: int,
                    epochs: int, lr: float, batch_size: int, seed: int, skip_ids=()) -> torch.Tensor:
    """Word embeddings (V, dim) learnt from notes and their codes, StarSpace TagSpace-style (Wu et al. 2017):
    a note is the mean of its tokens' embeddings, each code has an embedding, and the note should score its
    own codes above the others (dot similarity, softmax loss over the label vocabulary). Notes with no
    code or no token are skipped. The result is scaled to unit RMS (one scalar: directions and relative
    similarities unchanged) so the GRU sees inputs of a usual size. Tokens never seen keep their small
    random start."""
    gen = torch.Generator().manual_seed(seed)
    skip = np.asarray(sorted(skip_ids), dtype=np.int64)
    usable = []
    for ids, codes in zip(docs, labels):
        ids = np.asarray(ids, dtype=np.int64)
        ids = ids[~np.isin(ids, skip)]
        if len(ids) and len(codes):
            usable.append((torch.from_numpy(ids), torch.as_tensor(np.asarray(codes, dtype=np.int64))))
    words = nn.EmbeddingBag(vocab_size, dim, mode="mean")
    tags = nn.Embedding(n_labels, dim)
    with torch.no_grad():
        words.weight.normal_(0, 0.01, generator=gen)
        tags.weight.normal_(0, 0.01, generator=gen)
    optimizer = torch.optim.Adam(list(words.parameters()) + list(tags.parameters()), lr=lr)
    rng = np.random.default_rng(seed)
    for epoch in range(max(0, int(epochs))):
        total, batches = 0.0, 0
        order = rng.permutation(len(usable))
        for start in range(0, len(order), batch_size):
            batch = [usable[i] for i in order[start:start + batch_size]]
            flat = torch.cat([ids for ids, _ in batch])
            offsets = torch.tensor([0] + [len(ids) for ids, _ in batch[:-1]]).cumsum(0)
            notes = words(flat, offsets)  # (B, dim) mean of the note's token embeddings
            log_p = torch.log_softmax(notes @ tags.weight.T, dim=-1)  # (B, M)
            target = torch.zeros_like(log_p)
            for row, (_, codes) in enumerate(batch):
                target[row, codes] = 1.0 / len(codes)
            loss = -(target * log_p).sum(dim=1).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total, batches = total + float(loss.detach()), batches + 1
        log.info("starspace epoch %d/%d: loss %.4f", epoch + 1, epochs, total / max(1, batches))
    weight = words.weight.detach().clone()
    return weight / weight.pow(2).mean().sqrt().clamp(min=1e-12)


# ---- training ---------------------------------------------------------------------------------------------
@torch.no_grad()
def bilstm_probabilities(model: BiGruAttention, chunks: list[np.ndarray], batch_size: int,
                         device: torch.device, precision=None) -> np.ndarray:
    """(n, M) float32 probabilities of one chunk per note, batches sorted by length (least padding);
    precision: a `bertxml.models.precision.Precision` to autocast with (None: fp32)."""
    from bertxml.text.data import eval_batches, pad_ids
    from bertxml.models.precision import autocast

    was_training = model.training
    model.eval()
    out = np.zeros((len(chunks), model.n_labels), dtype=np.float32)
    lengths = np.array([len(c) for c in chunks], dtype=np.int64)
    for index in eval_batches(lengths, batch_size):
        ids, mask = pad_ids([chunks[i] for i in index], model.pad_id)  # (B, T)
        with autocast(device, precision):
            logits = model(ids.to(device), mask.to(device))["logits"]  # (B, M)
        out[index] = torch.sigmoid(logits.float()).cpu().numpy()
    model.train(was_training)
    return out


def train_bilstm(inputs, cfg: Config) -> Path:
    """StarSpace embeddings, then the BiGRU + multi-head attention on inputs' train split; the best dev
    macro AUC epoch is kept; thresholds tuned on dev; the model folder written. Returns it."""
    from tokenizers import Tokenizer

    from bertxml.text.data import bucketed_batches, coding_batch
    from bertxml.models.precision import autocast, decide_precision
    from bertxml.training.train import make_optimizer, pick_device, planned_steps, selection_score, set_threads

    bc = cfg.baseline
    out_dir = Path(inputs.out_dir)
    device = pick_device()
    set_threads(bc.threads or cfg.train.threads, device)
    precision = decide_precision(device, cfg.train.bf16)
    tokenizer = Tokenizer.from_file(inputs.tokenizer_file)
    pad_id = tokenizer.token_to_id("[PAD]") or 0
    vocab_size, m = tokenizer.get_vocab_size(), len(inputs.labels)
    train_set, _ = load_first_chunks(inputs, "train")
    dev_set, _ = load_first_chunks(inputs, "dev")
    train_labels, dev_labels = train_set.note_labels(m), dev_set.note_labels(m)
    log.info("bilstm: %d train notes, %d dev notes, %d labels, first %d tokens; embeddings %d, GRU 2 x %d, "
             "%d heads; precision %s", train_set.n_notes, dev_set.n_notes, m, inputs.max_len, bc.embed_dim,
             bc.bilstm_hidden_size, bc.bilstm_heads, precision)
    started = time.perf_counter()

    embeddings = train_starspace(train_set.input_ids, train_set.label_ids, vocab_size, m, bc.embed_dim,
                                 bc.starspace_epochs, bc.starspace_lr, bc.starspace_batch_size, bc.seed,
                                 _special_ids(tokenizer))
    torch.manual_seed(bc.seed)
    model = BiGruAttention(vocab_size, bc.embed_dim, bc.bilstm_hidden_size, bc.bilstm_heads, m,
                           bc.bilstm_dropout, pad_id)
    with torch.no_grad():
        model.embed.weight.copy_(embeddings)
        model.embed.weight[pad_id].zero_()
        prior = (train_labels.sum(axis=0) + 0.5) / (train_set.n_notes + 1.0)
        model.out.bias.copy_(torch.from_numpy(np.log(prior / (1 - prior))).float())
    model.to(device)
    optimizer = make_optimizer(model, bc.bilstm_lr, bc.bilstm_weight_decay)
    lengths = train_set.lengths
    steps_per_epoch = math.ceil(len(lengths) / bc.bilstm_batch_size)
    total_steps = planned_steps(bc.bilstm_epochs, 0, steps_per_epoch)
    best, best_state, history, step = None, None, [], 0

    def evaluate(at_step: int) -> None:
        nonlocal best, best_state
        if not dev_set.n_notes:
            return
        probs = bilstm_probabilities(model, dev_set.input_ids, cfg.train.eval_batch_size, device, precision)
        metrics = {**auc_metrics(probs, dev_labels), "step": at_step, "epoch": round(at_step / steps_per_epoch, 3)}
        history.append(metrics)
        if selection_score(metrics) > selection_score(best):
            best, best_state = metrics, {k: v.detach().clone() for k, v in model.state_dict().items()}
        log.info("bilstm dev at step %d: macro AUC %s, micro AUC %s", at_step, fmt_metric(metrics["macro_auc"]),
                 fmt_metric(metrics["micro_auc"]))

    epoch, window = 0, []
    while step < total_steps:
        for index in bucketed_batches(lengths, bc.bilstm_batch_size, bc.seed, epoch):
            if step >= total_steps:
                break
            batch = {k: v.to(device) for k, v in coding_batch(train_set, index, m, pad_id).items()}
            model.train()
            with autocast(device, precision):
                loss = model(**batch)["loss"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if bc.bilstm_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), bc.bilstm_clip)
            optimizer.step()
            step += 1
            window.append(float(loss.detach()))
            if step % cfg.train.log_every == 0:
                log.info("bilstm step %d/%d loss %.4f", step, total_steps, sum(window) / len(window))
                window = []
            if step % steps_per_epoch == 0 or step == total_steps:
                evaluate(step)
        epoch += 1
    if best_state is not None:
        model.load_state_dict(best_state)
    seconds = time.perf_counter() - started

    save_bilstm(model, out_dir, inputs.max_len)
    dev_probs = bilstm_probabilities(model, dev_set.input_ids, cfg.train.eval_batch_size, device, precision) \
        if dev_set.n_notes else None
    parameters = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    extra = {"steps": total_steps, "trainable_parameters": trainable, "train_notes": train_set.n_notes,
             "precision": precision.to_dict(), "dev_extra": {"best_step": (best or {}).get("step"), "history": history}}
    return _finish(out_dir, inputs, cfg, dev_probs, dev_set, parameters, seconds, extra)


# ---------------------------------------------------------------------------------------------------------
# Entry point


def train_baseline(inputs, cfg: Config) -> Path:
    """Train inputs.model_kind ("logreg" | "bilstm") from resolved inputs; returns the model folder."""
    if inputs.model_kind == "logreg":
        return train_logreg(inputs, cfg)
    if inputs.model_kind == "bilstm":
        return train_bilstm(inputs, cfg)
    raise ValueError(f"unknown baseline {inputs.model_kind!r}; choose one of {KINDS}")


def run_train_baseline(wh, cfg: Config, model_kind: str, out_dir: str | Path | None = None,
                       vocab_dir: str | Path | None = None) -> Path:
    """`bertxml train --model logreg|bilstm`: one baseline from the warehouse's tables as they stand (pinned),
    recorded in job_runs. Returns the model folder (default WORKDIR/models/<model_version>)."""
    from bertxml.models.registry import log_job_model
    from bertxml.platform.runs import job_run

    with job_run(wh, "train") as run:
        inputs = resolve_baseline_inputs(wh, cfg, model_kind, vocab_dir, out_dir)
        run.inputs.update(inputs.versions)
        model_dir = train_baseline(inputs, cfg)
        manifest = modeldir.load_manifest(model_dir)
        run.outputs["model_dir"] = str(model_dir)
        run.count("model_kind", model_kind)
        run.count("dev_macro_auc", manifest["dev_metrics"].get("macro_auc"))
        run.count("train_seconds", manifest["train_seconds"])
        log_job_model(run, wh, cfg, model_dir, "train")  # MLflow run + registered version (bertxml.models.registry)
    return Path(model_dir)


# ---------------------------------------------------------------------------------------------------------
# Scoring: the predictors `bertxml.scoring.score` dispatches to (registered there for "logreg" and "bilstm")


class BaselinePredictor:
    """A baseline model folder as `predict(texts) -> (n, M) float32`, plus `.score(texts) -> ScoredNotes`
    (one chunk a note; truncated when the note is longer than its first chunk) and `.info` (ModelInfo)."""

    def __init__(self, model_dir: str | Path, device: str | None = None, batch_size: int = 16,
                 num_threads: int | None = None, threshold_default: float = 0.5):
        from bertxml.text.vocab import load_tokenizer

        self.info = modeldir.read_model_info(model_dir, threshold_default)  # load_predictor checked the kind
        if num_threads:
            torch.set_num_threads(int(num_threads))
        self.tokenizer = load_tokenizer(self.info.model_dir)
        self.max_len = self.info.max_len
        self.batch_size = max(1, int(batch_size))
        self.arch = json.loads((self.info.model_dir / CONFIG_FILE).read_text())

    def probabilities(self, chunks: list[np.ndarray]) -> np.ndarray:
        raise NotImplementedError

    def score(self, texts):
        texts = list(texts.tolist() if isinstance(texts, np.ndarray) else texts)
        chunks, n_tokens, truncated = first_chunks(self.tokenizer, texts, self.max_len)
        probs = self.probabilities(chunks) if chunks else np.zeros((0, self.info.n_labels), dtype=np.float32)
        return modeldir.ScoredNotes(probs=probs, n_chunks=np.ones(len(texts), dtype=np.int64), n_tokens=n_tokens,
                           truncated=truncated)

    def __call__(self, texts) -> np.ndarray:
        return self.score(texts).probs


class LogRegPredictor(BaselinePredictor):
    def __init__(self, model_dir, device=None, batch_size: int = 16, num_threads=None, threshold_default=0.5):
        import safetensors.numpy

        super().__init__(model_dir, device, batch_size, num_threads, threshold_default)
        weights = safetensors.numpy.load_file(str(self.info.model_dir / WEIGHTS_FILE))
        self.coef, self.intercept = weights["coef"], weights["intercept"]
        self.idf = weights.get("idf")
        self.skip = self.arch.get("skip_ids", [])

    def probabilities(self, chunks):
        x = weight_features(bag_of_words(chunks, self.coef.shape[1], self.skip), self.idf)
        return logreg_probabilities(x, self.coef, self.intercept)


class BiGruPredictor(BaselinePredictor):
    def __init__(self, model_dir, device=None, batch_size: int = 16, num_threads=None, threshold_default=0.5):
        from bertxml.models.devices import resolve_device

        super().__init__(model_dir, device, batch_size, num_threads, threshold_default)
        self.device = torch.device(resolve_device(device))
        self.model = load_bilstm(self.info.model_dir, self.device)

    def probabilities(self, chunks):
        return bilstm_probabilities(self.model, chunks, self.batch_size, self.device)


def load_predictor(model_dir, device=None, **options) -> BaselinePredictor:
    """The `bertxml.scoring.score` factory for "logreg" and "bilstm" folders (options it does not use are ignored)."""
    kind = modeldir.load_manifest(model_dir).get("model_kind")
    cls = {"logreg": LogRegPredictor, "bilstm": BiGruPredictor}.get(kind)
    if cls is None:
        raise ValueError(f"{model_dir}: not a baseline folder (model_kind {kind!r})")
    known = ("batch_size", "num_threads", "threshold_default")
    return cls(model_dir, device, **{k: v for k, v in options.items() if k in known and v is not None})


def check_model_dir(info) -> None:
    """Driver-side check of a baseline folder (no weights loaded): files present, and the weights' output
    size equal to label_vocab.json's number of codes. Raises bertxml.models.modeldir.ModelDirError."""
    d = info.model_dir
    _, shapes = modeldir.check_weights_folder(info, CONFIG_FILE, WEIGHTS_FILE)
    out = shapes.get("intercept") if info.model_kind == "logreg" else shapes.get("out.bias")
    if out is None or out[0] != info.n_labels:
        raise modeldir.ModelDirError(f"{d}: the weights' output layer has shape {out}, not {info.n_labels} labels")
