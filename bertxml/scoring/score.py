"""Nightly scoring: the notes of one day through a trained model into `bertxml.predictions`.

    bertxml score [--date YYYY-MM-DD | --since-last] [--model DIR | --model models:/bertxml@champion] [--notes SOURCE]

With neither --date nor --since-last the job scores YESTERDAY (UTC). `--since-last` rescores, night by night,
every night holding a note this model version has neither scored nor rejected: the catch-up after missed
nights. `--model` takes a folder or a registered model (`models:/bertxml@champion`, `models:/bertxml/3`:
`bertxml.models.registry`); it defaults to score.model_dir, else the registry's `champion` alias where there is a
registry, else the newest trained model under WORKDIR/models. The model version, label vocabulary,
thresholds and tokenizer travel with the folder, so two model versions (a champion and a challenger) are
scored side by side: `bertxml.predictions` is keyed by model_version.

What a run does, each table written in ONE Delta transaction:
1. reads the notes SOURCE (default `cfg.warehouse.notes`, schema-checked) for the night, and applies the
   ETL's filters (`bertxml.etl.etl.note_reject_reason`, duplicate ids) plus one of its own, 'bad_text'
   (invalid UTF-8, a NUL character, or more than `score.max_replacement_share` U+FFFD characters: the
   feed's decoding already failed). Such notes go to `bertxml.rejects` (job 'score', batch = the note's
   date, rewritten with replaceWhere so a rerun never duplicates), never to the model;
2. scores the rest through an iterator pandas UDF (`mapInPandas`) whose Python worker loads the model
   ONCE (`make_predict_fn`, cached per process), takes its GPU from `TaskContext.resources()["gpu"]` when
   the cluster schedules GPUs, starts CUDA there and never on the driver, and autocasts to bf16 on a GPU
   that supports it (`bertxml.models.precision`);
3. replaces this model version's rows of the night in `bertxml.predictions` (partitioned by note_date) with
   the notes scored now, in one transaction (replaceWhere model_version and note_date): a note since marked
   erroneous, rejected or gone from the source loses its old row, and a rerun leaves the night's rows as one
   clean run would, whatever an earlier run left. Each predicted code carries a band (`predicted_bands`:
   'auto' at or above the code's auto-accept threshold, else 'review'). The model's label
   vocabulary and operating points are merged into `bertxml.model_labels` on (model_version, label_index);
4. recomputes the encounters of the nights' notes from all their notes' predictions and MERGEs them into
   `bertxml.encounter_predictions` (`bertxml.scoring.encounters`), and the analyst views are refreshed;
5. with `score.evidence` (the default) and a label-attention model, replaces the same nights' rows of
   `bertxml.evidence` the same way: for each predicted code of each note its `score.evidence_top_k` most
   attended spans, as character offsets into the note (never its text), computed by the engine in the
   pass that gives the probabilities (`predicted_attention`, `evidence_spans`).

The engine (`BertScorer`, what `make_predict_fn` returns for BERT models): notes -> chunks of at most
max_len tokens (`bertxml.text.tokenize.encode_chunks`, the training chunking); all chunks of a batch of notes
sorted by length and cut into batches of at most `score.batch_size * max_len` tokens, each padded only to
its own longest chunk (no padding to max_len); SDPA attention in the encoder, and the label attention
head as one fused SDPA call too (`label_attention_sdpa`, checked against the model's head at load);
`torch.inference_mode`; a note's probability per code is the max over its chunks (paper §4.1). On a CPU
with native bf16 (`score.cpu_bf16=auto`) the weights are cast to bf16 once and the label attention runs
in blocks of codes (`label_attention_blocked`), since CPU SDPA runs bf16 no faster than fp32. Evidence: the
fused head never forms the attention matrix, so for each pass the attention of only the codes some chunk
predicts is formed from the same token states; each predicted code's spans come from the chunk that set
its probability, mapped back to characters through the tokenizer's offsets.

Bad input, and what happens to it:
- empty, short, dropped or duplicated notes: rejected with the ETL's reason;
- undecodable text: rejected 'bad_text' before the UDF (invalid UTF-8 would otherwise fail the Arrow
  transfer of the whole batch, and with it the night);
- a note with no token left after normalisation: rejected 'no_tokens';
- a note longer than `score.max_chunks_per_note` chunks: SCORED ON ITS FIRST max_chunks_per_note CHUNKS,
  flagged `predictions.truncated = true` and counted (`notes_truncated`). A prediction from the first
  16K tokens is more use to a coder than none, and the flag says it is partial; the cap bounds a worker's
  time and memory on a runaway note (the text is also cut at `max_chunks * max_len * 64` characters
  before tokenisation);
- a model folder whose label_vocab.json disagrees with its weights' number of labels, or that lacks a
  file: a `ModelDirError` naming the folder and the problem, on the driver, before any note is read.

On a GPU cluster set, through `spark.conf` in the config: `spark.executor.resource.gpu.amount`,
`spark.task.resource.gpu.amount` (e.g. 1) and a discovery script; local mode needs nothing.

Model kinds: `PREDICTORS[manifest["model_kind"]]` is a factory `(model_dir, device, **options) -> predict`
with `predict(texts) -> (n, M) float32 probabilities`; "bertxml" and "cls" use `BertScorer`, and the
baselines plug in with `register_predictor(kind, factory)`.
"""
from __future__ import annotations

import datetime as dt
import inspect
import logging
import os
import re
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from bertxml.platform import faults
from bertxml.models import modeldir
from bertxml.platform import tables as t
from bertxml.config import Config, ScoreConfig, score_options
from bertxml.models.devices import resolve_device, task_cpus
from bertxml.models.modeldir import (LABEL_VOCAB_FILE, ModelDirError, ModelInfo, ScoredNotes, check_weights_folder,
                              predicted_bands, read_manifest, top_codes)
from bertxml.text.tokenize import clean_text, encode_notes

log = logging.getLogger("bertxml.scoring.score")

SCORE_COLUMNS = ("n_chunks", "truncated", "reason", "probabilities", "top_codes", "predicted_codes",
                 "predicted_bands", "evidence")


class NoNotesError(RuntimeError):
    """A night with no notes at all in the source: most likely the feed has not landed yet."""


def find_model_dir(workdir: str | Path) -> Path:
    """The newest finished trained model under WORKDIR/models (`bertxml.models.modeldir.find_latest_model`)."""
    from bertxml.models.modeldir import find_latest_model

    return find_latest_model(workdir)


def read_model_info(model_dir: str | Path, threshold_default: float = 0.5) -> ModelInfo:
    """`bertxml.models.modeldir.read_model_info` with this registry's kinds and kind-specific checks: raises
    ModelDirError for a folder no registered predictor can score."""
    return modeldir.read_model_info(model_dir, threshold_default, kinds=PREDICTORS, validators=VALIDATORS)


def _check_bert_dir(info: ModelInfo) -> None:
    """A BERT model folder: tokenizer.json, model_config.json and weights whose label count is M."""
    from bertxml.models.bert import CONFIG_FILE, WEIGHTS_FILE

    d = info.model_dir
    meta, shapes = check_weights_folder(info, CONFIG_FILE, WEIGHTS_FILE)
    head = shapes.get("head.label_vectors") or shapes.get("head.out.weight")
    if head is None or head[0] != info.n_labels:
        raise ModelDirError(f"{d}: the weights' output layer has shape {head}, not {info.n_labels} labels "
                            f"as {LABEL_VOCAB_FILE} says")
    positions = meta.get("bert_config", {}).get("max_position_embeddings")
    if positions is not None and info.max_len > int(positions):
        raise ModelDirError(f"{d}: max_len {info.max_len} exceeds the model's {positions} positions")


# ---- the engine ---------------------------------------------------------------------------------------------
class BertScorer:
    """Scores notes with a BERT model folder ("bertxml" or "cls" head). Call it: `scorer(texts) -> (n, M)`.

    device: None/'auto' (see `resolve_device`), 'cpu', 'cuda', 'cuda:1'. batch_size: chunks per forward
    pass at full length; a pass holds at most batch_size * max_len tokens, so short chunks go more to a
    pass. max_chunks_per_note: longer notes are scored on their first chunks (flagged `truncated`).
    num_threads: torch intra-op threads (None: leave torch's setting). cpu_bf16: run in bf16 on the CPU too
    (weights cast once; on GPU bf16 autocast is always on). evidence_top_k > 0: `score` also returns, for
    each predicted code, its evidence_top_k most attended spans (label-attention models only; see
    `evidence_spans`), spans cut at evidence_span_tokens tokens.
    """

    def __init__(self, model_dir: str | Path, device: str | None = None, batch_size: int = 16,
                 max_chunks_per_note: int = 32, num_threads: int | None = None, cpu_bf16="auto",
                 threshold_default: float = 0.5, evidence_top_k: int = 0, evidence_span_tokens: int = 32):
        import torch

        from bertxml.models.bert import load_model
        from bertxml.models.precision import decide_precision
        from bertxml.text.vocab import load_tokenizer

        self.info = read_model_info(model_dir, threshold_default)
        if self.info.model_kind not in ("bertxml", "cls"):
            raise ModelDirError(f"{model_dir}: BertScorer scores bertxml/cls models, not {self.info.model_kind!r}")
        if num_threads:
            torch.set_num_threads(int(num_threads))
        self.device = torch.device(resolve_device(device))
        self.tokenizer = load_tokenizer(self.info.model_dir)
        self.model = load_model(self.info.model_dir, self.device)
        if self.model.n_labels != self.info.n_labels:
            raise ModelDirError(f"{model_dir}: the weights have {self.model.n_labels} labels, "
                                f"{LABEL_VOCAB_FILE} {self.info.n_labels}")
        self.max_len = self.info.max_len
        self.batch_size = max(1, int(batch_size))
        self.token_budget = self.batch_size * self.max_len
        self.max_chunks = max(1, int(max_chunks_per_note))
        self.pad_id = int(self.model.config.pad_token_id or 0)
        # GPU: bf16 autocast where it supports bf16 (fp32 weights, bf16 matmuls). CPU: cpu_bf16 decides, and
        # the weights are cast to bf16 once, because CPU autocast re-casts every weight on every pass and
        # ends up slower than fp32.
        self.precision = decide_precision(self.device, cpu_bf16 if self.device.type == "cpu" else "auto")
        self.bf16 = self.precision.bf16
        self.autocast = self.bf16 and self.device.type == "cuda"
        # The label attention: one SDPA call, or on a bf16 CPU label blocks (CPU SDPA runs bf16 at fp32 speed).
        attend = label_attention_blocked if self.bf16 and not self.autocast else label_attention_sdpa
        self.fused_head = (attend if self.model.head_type == "bertxml"
                           and fused_head_matches(self.model, self.device, attend) else None)
        if self.bf16 and not self.autocast:
            self.model.to(torch.bfloat16)
        self.evidence_top_k = max(0, int(evidence_top_k or 0))
        self.evidence_span_tokens = max(1, int(evidence_span_tokens))
        if self.evidence_top_k and self.model.head_type != "bertxml":
            log.info("scorer %s: a %r model has no label attention, so no evidence", self.info.model_version,
                     self.model.head_type)
            self.evidence_top_k = 0
        # A code is predicted when sigmoid(logit) >= its threshold (float32, as `predicted_codes` decides).
        self.thresholds = torch.from_numpy(self.info.thresholds.astype(np.float32)).to(self.device)  # (M,)
        log.info("scorer %s (%s, %d labels, max_len %d), precision %s", self.info.model_version,
                 self.info.model_kind, self.info.n_labels, self.max_len, self.precision)

    # texts -> chunks ---------------------------------------------------------------------------------
    def encode(self, texts: list[str]) -> tuple[list[list[list[int]]], np.ndarray, np.ndarray]:
        """Texts -> (chunks per note, n_tokens (n,), truncated (n,)); at most max_chunks chunks a note."""
        return encode_notes(self.tokenizer, texts, self.max_len, self.max_chunks)

    # chunks -> logits ----------------------------------------------------------------------------------
    def chunk_logits(self, chunks: list[list[int]], evidence: bool = False):
        """Chunks (token id lists) -> logits (n_chunks, M) float32 on the CPU, in the chunks' order.

        Length bucketing: the chunks are sorted by length (longest first, so the first pass shows the peak
        memory) and cut into passes of at most token_budget tokens, each padded to its own longest chunk.

        evidence (a "bertxml" model): returns (logits, attended), attended[i] = [(label j, logit, weights
        (len(chunks[i]),) float32)] for every code j whose chunk probability reaches its threshold: eq. 2's
        attention of those codes only, from the same pass's token states (`predicted_attention`).
        """
        import torch

        n = len(chunks)
        out = torch.empty((n, self.info.n_labels), dtype=torch.float32)
        attended: list[list] = [[] for _ in range(n)]
        if n == 0:
            return (out, attended) if evidence else out
        lengths = np.fromiter((len(c) for c in chunks), dtype=np.int64, count=n)
        order = np.argsort(-lengths, kind="stable")
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast)
        start = 0
        with torch.inference_mode(), autocast:
            while start < n:
                width = int(lengths[order[start]])
                take = order[start:start + max(1, self.token_budget // width)]
                ids = np.full((len(take), width), self.pad_id, dtype=np.int64)
                mask = np.zeros((len(take), width), dtype=np.int64)
                for row, i in enumerate(take):
                    ids[row, :lengths[i]] = chunks[i]
                    mask[row, :lengths[i]] = 1
                ids_t = torch.from_numpy(ids).to(self.device, non_blocking=True)
                mask_t = torch.from_numpy(mask).to(self.device, non_blocking=True)
                if self.fused_head:
                    # The encoder gets the mask as (B, 1, 1, T) booleans, which transformers passes to SDPA
                    # as is (a 2-D mask is expanded to (B, 1, T, T)), or none when nothing is padded.
                    padded = lengths[take[-1]] != width
                    keep = (mask_t != 0)[:, None, None, :] if padded else None
                    hidden = self.model.bert(input_ids=ids_t, attention_mask=keep).last_hidden_state  # (B, T, H)
                    logits = self.fused_head(self.model.head, hidden, mask_t if padded else None)  # (B, M)
                elif evidence:  # the model's own head, with its token states kept for the evidence
                    hidden = self.model.bert(input_ids=ids_t, attention_mask=mask_t).last_hidden_state  # (B, T, H)
                    logits = self.model.head(hidden, mask_t)  # (B, M)
                else:
                    logits = self.model(ids_t, mask_t)["logits"]  # (B, M)
                logits = logits.float()
                out[torch.from_numpy(take)] = logits.cpu()
                if evidence:
                    for row, j, logit, weights in predicted_attention(self.model.head, hidden, mask_t, logits,
                                                                      self.thresholds):
                        i = take[row]
                        attended[i].append((j, logit, weights[:lengths[i]]))
                start += len(take)
        return (out, attended) if evidence else out

    # texts -> note probabilities ----------------------------------------------------------------------------
    def score(self, texts) -> ScoredNotes:
        """Note-level probabilities (max over chunks, paper §4.1) with chunk/token counts and truncation, and
        with evidence_top_k > 0 the evidence of each predicted code, from the same forward pass: the
        evidence_top_k spans (`evidence_spans`) of the chunk that set the code's probability (its largest
        logit) that the code's label attention weighs most, as character offsets into the note's text."""
        import torch

        from bertxml.models.bert import chunk_max

        texts = list(texts.tolist() if isinstance(texts, np.ndarray) else texts)
        evidence = self.evidence_top_k > 0
        notes, n_tokens, truncated, encodings = encode_notes(self.tokenizer, texts, self.max_len, self.max_chunks,
                                                             return_encodings=True)
        flat = [c for chunks in notes for c in chunks]
        note_index = torch.from_numpy(np.repeat(np.arange(len(notes)), [len(c) for c in notes]))
        if evidence:
            chunk_out, attended = self.chunk_logits(flat, evidence=True)
        else:
            chunk_out, attended = self.chunk_logits(flat), None
        logits = chunk_max(chunk_out, note_index, len(notes))  # (n, M); max commutes with sigmoid
        probs = torch.sigmoid(logits).numpy().astype(np.float32, copy=False)
        found = None
        if evidence:
            codes = self.info.codes
            hits = probs >= self.info.predict_thresholds[None, :]  # (n, M), as predicted_codes (any band)
            found, first = [], 0
            for i, chunks in enumerate(notes):
                rows = []
                if hits[i].any() and n_tokens[i] > 0:
                    best = {}  # code -> (logit, chunk of the note, weights): the chunk that set its probability
                    for c in range(len(chunks)):
                        for j, logit, weights in attended[first + c]:
                            if hits[i, j] and (j not in best or logit > best[j][0]):
                                best[j] = (logit, c, weights)
                    starts, ends = _token_offsets(encodings[i])
                    breaks = span_breaks(clean_text(texts[i]))
                    for j in sorted(best, key=lambda j: (-probs[i, j], j)):
                        _, c, weights = best[j]
                        for rank, (lo, hi, w) in enumerate(evidence_spans(
                                weights, c, self.max_len, starts, ends, breaks, self.evidence_top_k,
                                self.evidence_span_tokens), start=1):
                            rows.append({"code": codes[j], "rank": rank, "char_start": lo, "char_end": hi,
                                         "weight": w})
                found.append(rows)
                first += len(chunks)
        return ScoredNotes(probs=probs, n_chunks=np.array([len(c) for c in notes], dtype=np.int64),
                           n_tokens=n_tokens, truncated=truncated, evidence=found)

    def __call__(self, texts) -> np.ndarray:
        return self.score(texts).probs


# ---- evidence: the label attention of the predicted codes -----------------------------------------------
def predicted_attention(head, hidden, attention_mask, logits, thresholds):
    """Eq. 2's attention weights of the codes each chunk predicts, from a pass's token states.

    The fused head never forms the (B, M, T) attention; this forms it only for the U codes that some chunk
    of the pass predicts (sigmoid(logit) >= threshold): (B, U, T) scores, about U/M of the head's cost,
    with U a few dozen against M in the thousands. Softmax in float32 over the real tokens, as
    `LabelAttention` does. hidden (B, T, H), attention_mask (B, T), logits (B, M) float32, thresholds (M,).
    Yields (row b, code j, logit, weights (T,) float32 numpy incl. [CLS]/[SEP], 0 on padding).
    """
    import torch

    hits = torch.sigmoid(logits) >= thresholds[None, :]  # (B, M)
    pairs = hits.nonzero()  # (P, 2): (row, code)
    if pairs.shape[0] == 0:
        return
    codes, slot = torch.unique(pairs[:, 1], return_inverse=True)  # (U,), (P,)
    labels = head.label_vectors[codes].to(hidden.dtype)  # (U, H)
    scores = torch.matmul(labels, hidden.transpose(1, 2)).float()  # (B, U, T); eq. 2 has no 1/sqrt(H)
    scores = scores.masked_fill(attention_mask[:, None, :] == 0, torch.finfo(torch.float32).min)
    weights = scores.softmax(dim=-1)[pairs[:, 0], slot].cpu().numpy()  # (P, T)
    chosen = logits[pairs[:, 0], pairs[:, 1]].cpu().tolist()
    for (row, j), logit, w in zip(pairs.cpu().tolist(), chosen, weights):
        yield row, j, logit, w


SPAN_BREAK = re.compile(r"\n|[.;!?](?=\s)")  # a line break, or sentence punctuation before a space


def span_breaks(text: str) -> np.ndarray:
    """Character offsets where a new sentence-ish span starts: after each line break, and after '.', ';',
    '!' or '?' followed by white space (so "2.5 mg" stays whole; "Dr. Smith" is cut: sentence-ish)."""
    return np.fromiter((m.end() for m in SPAN_BREAK.finditer(text)), dtype=np.int64)


def _token_offsets(encoding) -> tuple[np.ndarray, np.ndarray]:
    """A note's token (start, end) character offsets, as two (n_tokens,) arrays."""
    offsets = np.asarray(encoding.offsets, dtype=np.int64).reshape(-1, 2)
    return offsets[:, 0], offsets[:, 1]


def evidence_spans(weights: np.ndarray, chunk_index: int, max_len: int, starts: np.ndarray, ends: np.ndarray,
                   breaks: np.ndarray, top_k: int, span_tokens: int) -> list[tuple[int, int, float]]:
    """One code's evidence in one chunk: its top_k spans as (char_start, char_end, weight), heaviest first.

    weights (len(chunk),): the code's eq. 2 attention over the chunk, [CLS] and [SEP] included (they are
    left out: not text). The chunk's tokens are grouped into spans: the tokens of one sentence-ish piece
    of the note (`span_breaks`), cut into runs of at most span_tokens tokens so a long unpunctuated
    paragraph is not one span; a span's weight is the attention mass on its tokens (its share of the
    code's attention, the chunk's summing to 1 with [CLS]/[SEP]). Offsets run from the span's first
    token's start to its last token's end: [char_start, char_end) in the note's characters (Python str
    indices, i.e. code points: Spark SQL's `substring(text, char_start + 1, char_end - char_start)`).
    """
    content = np.asarray(weights[1:-1], dtype=np.float64)  # (t,) without [CLS] and [SEP]
    t = content.shape[0]
    if t == 0 or top_k <= 0:
        return []
    from bertxml.text.tokenize import chunk_token

    tokens = chunk_token(chunk_index, np.arange(1, t + 1), max_len)  # note token index of each weight
    sentence = np.searchsorted(breaks, starts[tokens], side="right")  # (t,) sentence-ish piece of each token
    opens = np.empty(t, dtype=bool)
    opens[0], opens[1:] = True, sentence[1:] != sentence[:-1]
    opened = np.flatnonzero(opens)
    in_piece = np.arange(t) - opened[np.cumsum(opens) - 1]  # position of each token within its piece
    opens |= in_piece % span_tokens == 0
    span = np.cumsum(opens) - 1  # (t,) span of each token
    first = np.flatnonzero(opens)
    last = np.append(first[1:] - 1, t - 1)
    mass = np.bincount(span, weights=content)
    best = np.argsort(-mass, kind="stable")[:top_k]
    return [(int(starts[tokens[first[s]]]), int(ends[tokens[last[s]]]), float(mass[s])) for s in best]


def label_attention_sdpa(head, hidden, attention_mask):
    """The label attention head (paper eq. 2-4, `bertxml.models.bert.LabelAttention`) as ONE fused
    scaled-dot-product-attention call: queries are the label vectors l_j, keys and values the token
    states, scale 1 (eq. 2 has no 1/sqrt(H)). Same logits as the module, without materialising the
    (B, M, T) attention matrix, which at M = 2,292 labels costs more than a small encoder.

    hidden (B, T, H), attention_mask (B, T) or None (no padding: SDPA's faster unmasked path) -> logits (B, M).
    """
    import torch.nn.functional as F

    b = hidden.shape[0]
    queries = head.label_vectors.to(hidden.dtype)[None, None].expand(b, 1, -1, -1)  # (B, 1, M, H)
    states = hidden[:, None]  # (B, 1, T, H)
    keep = None if attention_mask is None else attention_mask[:, None, None, :] != 0  # (B, 1, 1, T)
    context = F.scaled_dot_product_attention(queries, states, states, attn_mask=keep, scale=1.0)[:, 0]  # (B, M, H)
    return _label_logits(head, context)


def label_attention_blocked(head, hidden, attention_mask, block: int = 256):
    """`label_attention_sdpa` as plain matmuls over blocks of `block` labels, for bf16 on the CPU, where
    the SDPA kernel runs at fp32 speed: each block's (B, block, T) scores stay in cache between the two
    products and the softmax. About 3x faster than CPU SDPA at 2,292 labels, T = 512, in bf16."""
    import torch

    labels = head.label_vectors.to(hidden.dtype)  # (M, H)
    keys = hidden.transpose(1, 2)  # (B, H, T)
    bias = None
    if attention_mask is not None:  # -inf on padding, added to every block's scores
        bias = torch.zeros(attention_mask.shape, dtype=hidden.dtype, device=hidden.device)
        bias = bias.masked_fill(attention_mask == 0, float("-inf"))[:, None, :]  # (B, 1, T)
    context = hidden.new_empty((hidden.shape[0], labels.shape[0], hidden.shape[2]))  # (B, M, H)
    for start in range(0, labels.shape[0], block):
        scores = torch.matmul(labels[start:start + block], keys)  # (B, block, T); eq. 2 has no 1/sqrt(H)
        if bias is not None:
            scores += bias
        context[:, start:start + block] = torch.matmul(torch.softmax(scores, dim=-1), hidden)
    return _label_logits(head, context)


def _label_logits(head, context):
    """(B, M, H) label contexts -> (B, M) eq. 4 logits."""
    import torch.nn.functional as F

    return head.w_a(F.relu(head.w_b(context))).squeeze(-1)


def fused_head_matches(model, device, attend=label_attention_sdpa, tolerance: float = 1e-4) -> bool:
    """Check, once at load, that `attend` (label_attention_sdpa or _blocked) gives the model's own head
    logits on a random padded batch; if the module ever changes (a scale, a bias), the engine falls back."""
    import torch

    try:
        gen = torch.Generator().manual_seed(0)
        hidden = torch.randn(2, 7, model.config.hidden_size, generator=gen).to(device)
        mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3], device=device)
        with torch.inference_mode():
            fused = attend(model.head, hidden, mask).float()
            diff = (model.head(hidden, mask).float() - fused).abs().max()
    except Exception as exc:  # noqa: BLE001 - any failure means: use the module
        log.warning("fused label attention unavailable (%s): using the model's head", exc)
        return False
    if float(diff) > tolerance:
        log.warning("fused label attention differs from the model's head by %.2e: using the model's head",
                    float(diff))
        return False
    return True


# ---- the registry of model kinds ----------------------------------------------------------------------------
def _bert_factory(model_dir, device=None, **options) -> BertScorer:
    return BertScorer(model_dir, device=device, **options)


PREDICTORS: dict[str, Callable] = {"bertxml": _bert_factory, "cls": _bert_factory}
VALIDATORS: dict[str, Callable[[ModelInfo], None]] = {"bertxml": _check_bert_dir, "cls": _check_bert_dir}


def register_predictor(kind: str, factory: Callable, validate: Callable[[ModelInfo], None] | None = None) -> None:
    """Plug a model kind in: `factory(model_dir, device, **options) -> predict(texts) -> (n, M) float32`.

    The factory may accept only the options it knows (see `make_predict_fn`); `validate(info)` may check
    the folder on the driver (raise ModelDirError) before any Spark task starts.
    """
    PREDICTORS[kind] = factory
    if validate is not None:
        VALIDATORS[kind] = validate


def _baseline_factory(model_dir, device=None, **options):
    from bertxml.models.baselines import load_predictor

    return load_predictor(model_dir, device, **options)


def _check_baseline_dir(info: ModelInfo) -> None:
    from bertxml.models.baselines import check_model_dir

    check_model_dir(info)


for _kind in ("logreg", "bilstm"):  # the paper's baselines (bertxml.models.baselines), imported on first use
    register_predictor(_kind, _baseline_factory, _check_baseline_dir)


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


# ---- the worker side of the UDF ------------------------------------------------------------------------------
_WORKER_PREDICTORS: dict[tuple, Callable] = {}


def worker_predictor(model_dir: str, device: str, options: dict) -> Callable:
    """This Python worker's predictor for model_dir, built on first use and kept: Spark reuses a worker
    for many tasks and batches, so the model loads once per worker. Device and threads are decided here,
    in the worker (the task's GPU; threads = the task's CPUs unless set)."""
    options = dict(options)
    if not options.get("num_threads"):
        options["num_threads"] = task_cpus()
        if options["num_threads"] == 1:
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    device = resolve_device(device)
    key = (str(model_dir), device, tuple(sorted(options.items())))
    if key not in _WORKER_PREDICTORS:
        for old in [k for k in _WORKER_PREDICTORS if k[0] == key[0]]:
            del _WORKER_PREDICTORS[old]  # same model on another device: free it first
        started = time.perf_counter()
        _WORKER_PREDICTORS[key] = make_predict_fn(model_dir, device, **options)
        log.info("worker pid %d loaded %s on %s in %.1fs", os.getpid(), model_dir, device,
                 time.perf_counter() - started)
    return _WORKER_PREDICTORS[key]


def score_frames(frames: Iterator, model_dir: str, device: str, options: dict, top_k: int,
                 out_columns: list[str]) -> Iterator:
    """mapInPandas body: frames of notes (with `text`) -> frames of the other columns + SCORE_COLUMNS.

    A note with no token after normalisation gets reason 'no_tokens' and no probabilities. `evidence` is
    the engine's (`BertScorer.score` with evidence_top_k > 0), null for a model or options without it.
    """
    import pandas as pd

    predict = info = codes = None
    batches = 0
    for frame in frames:
        if len(frame) == 0:
            continue
        batches += 1
        if batches == 2:
            faults.point("score:udf")
        if predict is None:  # on the first notes: a task with an empty partition never loads the model
            predict = worker_predictor(model_dir, device, options)
            info = getattr(predict, "info", None) or read_model_info(model_dir, options.get("threshold_default", 0.5))
            codes = np.array(info.codes, dtype=object)
        texts = frame["text"].tolist()
        if hasattr(predict, "score"):
            scored = predict.score(texts)
        else:  # a baseline predictor: probabilities only
            scored = ScoredNotes(probs=np.asarray(predict(texts), dtype=np.float32),
                                 n_chunks=np.ones(len(texts), dtype=np.int64),
                                 n_tokens=np.full(len(texts), -1), truncated=np.zeros(len(texts), dtype=bool))
        probs = scored.probs
        empty = scored.n_tokens == 0
        out = frame.drop(columns=["text"])
        out["n_chunks"] = scored.n_chunks.astype("int32")
        out["truncated"] = scored.truncated.astype(bool)
        out["reason"] = np.where(empty, "no_tokens", None)
        tops, (hits, bands) = top_codes(probs, codes, top_k), predicted_bands(probs, info)
        out["probabilities"] = [None if e else p for e, p in zip(empty, probs)]
        out["top_codes"] = [None if e else x for e, x in zip(empty, tops)]
        out["predicted_codes"] = [None if e else x for e, x in zip(empty, hits)]
        out["predicted_bands"] = [None if e else x for e, x in zip(empty, bands)]
        spans = scored.evidence if scored.evidence is not None else [None] * len(texts)
        out["evidence"] = [None if e else x for e, x in zip(empty, spans)]
        yield pd.DataFrame(out, columns=out_columns)


def scored_schema(df_schema):
    """Output schema of `score_notes`: df's columns without `text`, then SCORE_COLUMNS."""
    from pyspark.sql import types as T

    fields = [f for f in df_schema.fields if f.name != "text"]
    return T.StructType(fields + [
        T.StructField("n_chunks", T.IntegerType()),
        T.StructField("truncated", T.BooleanType()),
        T.StructField("reason", T.StringType()),
        T.StructField("probabilities", T.ArrayType(T.FloatType(), False)),
        T.StructField("top_codes", T.ArrayType(t.TOP_CODE)),
        T.StructField("predicted_codes", T.ArrayType(T.StringType())),
        T.StructField("predicted_bands", T.ArrayType(T.StringType())),
        T.StructField("evidence", T.ArrayType(t.EVIDENCE_SPAN)),
    ])


def score_notes(notes, model_dir: str | Path, cfg: ScoreConfig, partitions: int | None = None):
    """DataFrame of notes (`text` + any columns to carry along) -> DataFrame of those columns plus
    n_chunks, truncated, reason ('no_tokens' or null), probabilities, top_codes, predicted_codes, evidence
    (ARRAY<tables.EVIDENCE_SPAN>; null unless cfg.evidence and a label-attention model).

    The notes are spread over `partitions` (default cfg.partitions or the cluster's parallelism) so
    every task slot scores. Set spark.sql.execution.arrow.maxRecordsPerBatch (see `arrow_batch_conf`)
    around the action that runs it.
    """
    model_dir = str(Path(model_dir).resolve())
    schema = scored_schema(notes.schema)
    out_columns = [f.name for f in schema.fields]
    options, device, top_k = score_options(cfg), cfg.device, cfg.top_k
    n_parts = partitions or cfg.partitions or notes.sparkSession.sparkContext.defaultParallelism

    def score(frames):
        yield from score_frames(frames, model_dir, device, options, top_k, out_columns)

    return notes.repartition(n_parts).mapInPandas(score, schema=schema)


class arrow_batch_conf:
    """`with arrow_batch_conf(spark, n):` sets spark.sql.execution.arrow.maxRecordsPerBatch = n notes
    (about 9 KB of float32 probabilities per note for 2,292 codes) and restores the previous value."""

    KEY = "spark.sql.execution.arrow.maxRecordsPerBatch"

    def __init__(self, spark, notes_per_batch: int):
        self.spark, self.n = spark, int(notes_per_batch)

    def __enter__(self):
        self.old = self.spark.conf.get(self.KEY, None)
        self.spark.conf.set(self.KEY, str(self.n))
        return self

    def __exit__(self, *exc):
        if self.old is None:
            self.spark.conf.unset(self.KEY)
        else:
            self.spark.conf.set(self.KEY, self.old)


# ---- the nightly job ---------------------------------------------------------------------------------------
def bad_text_reason(cfg: ScoreConfig):
    """'bad_text' for text the feed could not decode: invalid UTF-8, a NUL character, or more than
    cfg.max_replacement_share of U+FFFD replacement characters; null otherwise."""
    from pyspark.sql import functions as F

    text = F.col("text")
    n = F.length(text)
    replaced = n - F.length(F.regexp_replace(text, "\ufffd", ""))
    return (F.when(text.isNull(), F.lit(None))
            .when(~F.is_valid_utf8(text), "bad_text")
            .when(text.contains("\x00"), "bad_text")
            .when(replaced > F.lit(cfg.max_replacement_share) * n, "bad_text"))


def flag_notes(notes, cfg: Config):
    """Input-schema notes -> the same with a `reason` (null = score it): the ETL's filters and duplicate
    rule (`bertxml.etl.etl`), then 'bad_text'."""
    from pyspark.sql import functions as F

    from bertxml.etl.etl import dedupe_notes, note_reject_reason

    flagged = notes.withColumn("reason", F.coalesce(note_reject_reason(cfg.etl), bad_text_reason(cfg.score)))
    return dedupe_notes(flagged.filter(F.col("reason").isNull())).unionByName(
        flagged.filter(F.col("reason").isNotNull()))


def parse_date(value) -> dt.date:
    if isinstance(value, dt.datetime):
        return value.date()
    if isinstance(value, dt.date):
        return value
    try:
        return dt.date.fromisoformat(str(value))
    except ValueError:
        raise ValueError(f"--date expects YYYY-MM-DD, got {value!r}") from None


def yesterday_utc() -> dt.date:
    return dt.datetime.now(dt.timezone.utc).date() - dt.timedelta(days=1)


def _read_notes(wh, spec: str):
    """The notes source, schema-checked, pinned to the Delta version read (so the job sees one snapshot)."""
    notes, read = wh.read_source(spec, t.NOTES_SCHEMA, "notes")
    if read.get("version") is not None:
        notes, read = wh.read_source(spec, t.NOTES_SCHEMA, "notes", version=read["version"])
    return notes, read


def run_score(wh, cfg: Config, date=None, since_last: bool = False, model_dir: str | Path | None = None,
              notes_source: str | None = None) -> dict:
    """Score one night (`date`, default yesterday UTC) or catch up (`since_last`).

    A night: every note dated `date` is filtered and the kept ones scored (a rerun rescores them: same
    rows). Catch-up: the dates holding a note neither scored by this model version nor rejected are
    processed as nights, each as `date` would process it (all its notes).
    Writes bertxml.predictions (replaceWhere the model version and those nights: their rows become the notes
    scored now), bertxml.model_labels (on model_version, label_index) and
    bertxml.rejects (replaceWhere job = 'score' and the nights processed), then refreshes
    the views. Returns the job's counts (notes_read, rejected, rejected_by_reason, notes_scored, chunks,
    notes_truncated, notes_per_s, ...). Raises on failure, for the exit status: a bad model folder
    (ModelDirError), a bad source schema (SchemaError), a night with no notes at all (NoNotesError,
    unless cfg.score.allow_empty).
    """
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    from bertxml.scoring.drift import run_night_drift
    from bertxml.models.registry import resolve_model
    from bertxml.platform.runs import job_run
    from bertxml.platform.views import create_views

    if date is not None and since_last:
        raise ValueError("give --date or --since-last, not both")
    night = None if since_last else (parse_date(date) if date is not None else yesterday_utc())
    with job_run(wh, "score") as run:
        resolved = resolve_model(cfg, wh.workdir, model_dir)  # a folder, a models:/ URI, or the default
        info = read_model_info(resolved.model_dir, cfg.score.threshold_default)  # fails here, before Spark work
        run.inputs["model"] = {**resolved.to_dict(), "dir": str(info.model_dir), "model_version": info.model_version}
        run.count("model_version", info.model_version)
        notes, read = _read_notes(wh, notes_source or cfg.warehouse.notes)
        run.inputs["notes"] = read
        all_notes = notes
        done = _scored_ids(wh, run, info.model_version)
        if night is not None:
            nights = [night]
            notes = notes.filter(F.col("note_date") == F.lit(night))
        else:
            nights = _pending_nights(wh, notes, done)
            notes = notes.filter(F.col("note_date").isin([d for d in nights if d is not None])
                                 | (F.col("note_date").isNull() if None in nights else F.lit(False)))
        batches = [d.isoformat() if d is not None else "undated" for d in nights]
        run.count("batches", batches if len(batches) <= 31 else f"{len(batches)} nights")
        if not nights:
            log.info("score: every note is scored or rejected already (model %s)", info.model_version)
            for key in ("notes_read", "rejected", "notes_scored", "chunks", "notes_truncated"):
                run.count(key, 0)
            return {"run_id": run.run_id, **run.counts, "outputs": run.outputs}

        flagged = flag_notes(notes, cfg).persist(StorageLevel.MEMORY_AND_DISK)
        try:
            by_reason = {r["reason"]: r["n"]
                         for r in flagged.groupBy("reason").agg(F.count("*").alias("n")).collect()}
            run.count("notes_read", sum(by_reason.values()))
            if not by_reason and not since_last and not cfg.score.allow_empty:
                raise NoNotesError(f"no notes dated {night} in {read['source']}: the feed may not have landed "
                                   f"(set score.allow_empty=true to accept an empty night)")
            kept = flagged.filter(F.col("reason").isNull()).drop("reason").withColumn("text_bytes", F.octet_length("text"))
            _score_and_write(wh, cfg, run, info, kept, flagged, by_reason, batches, all_notes)
            run_night_drift(wh, cfg, run, info, kept, batches)  # bertxml.night_drift, against training
        finally:
            flagged.unpersist()
        create_views(wh)
        return {"run_id": run.run_id, **run.counts, "outputs": run.outputs}


def _scored_ids(wh, run, model_version: str):
    """note_id of every note this model version has scored (None when nothing is scored yet), read at a
    pinned Delta version so the job sees one snapshot however long it runs."""
    from pyspark.sql import functions as F

    name = wh.name(t.PREDICTIONS)
    if not wh.exists(name):
        return None
    version = wh.version(name)
    run.inputs[name] = version
    return wh.table(name, version=version).filter(F.col("model_version") == model_version).select("note_id")


def _pending_nights(wh, notes, done) -> list:
    """Dates (None for undated) holding a note that is neither scored by this model nor rejected by an
    earlier scoring run: the nights a catch-up must process. Reads ids and dates only, not the text."""
    from pyspark.sql import functions as F

    pending = notes.select("note_id", "note_date")
    if done is not None:
        pending = pending.join(done, "note_id", "left_anti")
    rejects = wh.name(t.REJECTS)
    if wh.exists(rejects):
        seen = wh.table(rejects).filter(F.col("job") == "score").select("note_id").distinct()
        pending = pending.join(seen, "note_id", "left_anti")
    return sorted((r[0] for r in pending.select("note_date").distinct().collect()),
                  key=lambda d: (d is None, d or dt.date.min))


def _score_and_write(wh, cfg: Config, run, info: ModelInfo, kept, flagged, by_reason: dict,
                     batches: list[str], all_notes) -> None:
    """Run the model over the kept notes (one Spark action, timed) and write the four tables.
    `all_notes`: the whole notes source (the pinned snapshot), for the encounters' other notes."""
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    from bertxml.etl.etl import reject_rows
    from bertxml.platform.warehouse import sql_string

    spark = wh.spark
    scored_at = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None, microsecond=0)
    note_cols = [f.name for f in t.NOTES_SCHEMA.fields if f.name != "text"] + ["text_bytes"]
    rejected = (flagged.filter(F.col("reason").isNotNull()).withColumn("text_bytes", F.octet_length("text"))
                .select(*note_cols, "reason"))
    seconds, stats, scored = 0.0, {}, None
    try:
        if by_reason.get(None):
            scored = score_notes(kept, info.model_dir, cfg.score).persist(StorageLevel.MEMORY_AND_DISK)
            started = time.perf_counter()
            with arrow_batch_conf(spark, cfg.score.arrow_batch_notes):  # the one action that runs the model
                stats = {r["reason"]: r for r in scored.groupBy("reason").agg(
                    F.count("*").alias("n"), F.sum("n_chunks").alias("chunks"),
                    F.sum(F.col("truncated").cast("int")).alias("truncated"),
                    F.sum(F.when(F.col("evidence").isNotNull(), F.size("evidence")).otherwise(0))
                    .alias("evidence")).collect()}
            seconds = time.perf_counter() - started
            rejected = rejected.unionByName(scored.filter(F.col("reason").isNotNull()).select(*note_cols, "reason"))
        ok = stats.get(None)
        n_scored = int(ok["n"]) if ok else 0
        n_run = sum(int(r["n"]) for r in stats.values())  # notes through the model, incl. 'no_tokens'
        name = wh.name(t.PREDICTIONS)
        dated = [b for b in batches if b != "undated"]  # undated notes are always rejected (null_note_date)
        if n_scored or (dated and wh.exists(name)):
            if n_scored:
                _write_model_labels(wh, run, info)
                preds = scored.filter(F.col("reason").isNull()).select(
                    "note_id", "patient_id", "note_date", F.lit(info.model_version).alias("model_version"),
                    F.lit(run.run_id).alias("run_id"), F.lit(scored_at).cast("timestamp").alias("scored_at"),
                    "probabilities", "top_codes", "predicted_codes", "n_chunks", "truncated", "encounter_id",
                    "predicted_bands")
                preds = preds.select(*[F.col(f.name).cast(f.dataType).alias(f.name)
                                       for f in t.PREDICTIONS_SCHEMA.fields])
            else:  # every note of the nights rejected: the write only deletes their old rows
                preds = spark.createDataFrame([], t.PREDICTIONS_SCHEMA)
            # The nights' rows of this model version are replaced by the notes scored now, in one transaction
            # (replaceWhere): a note scored before and now rejected, or gone from the source, loses its old
            # row; only the nights' partitions are read and rewritten.
            scope = (f"model_version = {sql_string(info.model_version)} AND note_date IN ("
                     + ", ".join(f"DATE'{d}'" for d in dated) + ")")
            before = wh.version(name)  # the nights' rows as they were: their encounters are touched too
            run.outputs[name] = wh.write(preds, name, replace_where=scope, partition_by=t.PREDICTIONS_PARTITIONS,
                                         merge_schema=True)
            if dated:
                from bertxml.scoring.encounters import write_encounter_predictions

                write_encounter_predictions(wh, run, info, all_notes, dated, before, run.outputs[name], scored_at,
                                            cfg.score.top_k)
        _write_evidence(wh, cfg, run, info, scored if n_scored else None, dated)

        # Rejects: batch = the note's date, so a rerun of a night (or a catch-up over it) replaces its own rows.
        n_rejected = sum(n for r, n in by_reason.items() if r) + sum(int(r["n"]) for k, r in stats.items() if k)
        reject_df = reject_rows(rejected, "notes", "score", "-", run.run_id).withColumn(
            "batch", F.coalesce(F.get_json_object("record", "$.note_date"), F.lit("undated")))
        rejects_name = wh.name(t.REJECTS)
        if batches and (n_rejected or wh.exists(rejects_name)):
            where = "job = 'score' AND batch IN (" + ", ".join(f"'{b}'" for b in batches) + ")"
            run.outputs[rejects_name] = wh.write(reject_df, rejects_name, replace_where=where,
                                                partition_by=t.REJECTS_PARTITIONS)

        reasons = {r: int(n) for r, n in by_reason.items() if r}
        for reason, row in stats.items():
            if reason:
                reasons[reason] = reasons.get(reason, 0) + int(row["n"])
        run.count("rejected", n_rejected)
        run.count("rejected_by_reason", dict(sorted(reasons.items())))
        run.count("notes_scored", n_scored)
        run.count("chunks", int(ok["chunks"] or 0) if ok else 0)
        run.count("notes_truncated", int(ok["truncated"] or 0) if ok else 0)
        run.count("evidence_spans", int(ok["evidence"] or 0) if ok else 0)
        run.count("scoring_seconds", round(seconds, 2))
        run.count("notes_per_s", round(n_run / seconds, 2) if seconds and n_run else None)
        if n_scored == 0:
            log.warning("score: no note scored in %s", ", ".join(batches[:5]))
    finally:
        if scored is not None:
            scored.unpersist()


def _write_evidence(wh, cfg: Config, run, info: ModelInfo, scored, dated: list[str]) -> None:
    """The nights' evidence rows of this model version become those of the notes scored now (`scored`, the
    UDF's persisted output; None when no note was scored), in one transaction: replaceWhere model_version and
    the nights, as predictions. With score.evidence off (or a model without label attention) an existing
    table loses the nights' rows of this model version, so it never disagrees with the predictions; a
    missing one is not created."""
    from pyspark.sql import functions as F

    from bertxml.platform.warehouse import sql_string

    name = wh.name(t.EVIDENCE)
    on = cfg.score.evidence and cfg.score.evidence_top_k > 0 and info.model_kind == "bertxml"
    if not dated or (not (on and scored is not None) and not wh.exists(name)):
        return
    if on and scored is not None:
        spans = (scored.filter(F.col("reason").isNull())
                 .select("note_id", "note_date", F.explode("evidence").alias("e"))
                 .select("note_id", "note_date", F.lit(info.model_version).alias("model_version"), "e.*",
                         F.lit(run.run_id).alias("run_id")))
        spans = spans.select(*[F.col(f.name).cast(f.dataType).alias(f.name) for f in t.EVIDENCE_SCHEMA.fields])
    else:
        spans = wh.spark.createDataFrame([], t.EVIDENCE_SCHEMA)
    scope = (f"model_version = {sql_string(info.model_version)} AND note_date IN ("
             + ", ".join(f"DATE'{d}'" for d in dated) + ")")
    run.outputs[name] = wh.write(spans, name, replace_where=scope, partition_by=t.EVIDENCE_PARTITIONS)


def _write_model_labels(wh, run, info: ModelInfo) -> None:
    """The model's label vocabulary and operating points into bertxml.model_labels (MERGE on model_version,
    label_index), once per model version: the views join predictions to codes through it. A table an
    earlier bertxml created gains the operating-point columns (schema evolution) on the next write."""
    from pyspark.sql import functions as F

    name = wh.name(t.MODEL_LABELS)
    if wh.exists(name):
        table = wh.table(name)
        if (set(t.MODEL_LABELS_SCHEMA.fieldNames()) <= set(table.columns)
                and table.filter(F.col("model_version") == info.model_version).count() == info.n_labels):
            return
    labels = wh.spark.createDataFrame(info.label_rows(), t.MODEL_LABELS_SCHEMA)
    run.outputs[name] = wh.merge(labels, name, ["model_version", "label_index"], evolve_schema=True)
