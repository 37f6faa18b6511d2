"""The engine: a BERT model folder as a plain numpy -> numpy predict function (`BertScorer`).

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

torch, and the model code that needs it (`bertxml.models.bert`, `.precision`), are imported inside the
functions that run the model: the Spark driver imports this module (through the predictors and the UDF)
to check a model folder and plan the scoring job, and never loads torch; a worker does, once it builds a
`BertScorer`.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from bertxml.models import modeldir
from bertxml.models.devices import resolve_device
from bertxml.models.modeldir import (CONFIG_FILE, LABEL_VOCAB_FILE, WEIGHTS_FILE, ModelDirError, ModelInfo, ScoredNotes,
                                     check_weights_folder)
from bertxml.scoring.evidence import evidence_spans, predicted_attention, span_breaks, token_offsets
from bertxml.text.tokenize import clean_text, encode_notes
from bertxml.text.vocab import load_tokenizer

log = logging.getLogger("bertxml.scoring.engine")

# A pass is padded to a multiple of this many tokens: a few dozen tensor shapes instead of one per chunk
# length, each of which the native libraries keep state for (a worker's memory grew with every new shape:
# benchmarks/README.md, "Scale").
PASS_WIDTH_MULTIPLE = 16


def check_bert_dir(info: ModelInfo) -> None:
    """A BERT model folder: tokenizer.json, model_config.json and weights whose label count is M."""
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
        # torch only where the model runs, not on the Spark driver (module docstring)
        import torch

        from bertxml.models.bert import load_model
        from bertxml.models.precision import decide_precision

        self.info = modeldir.read_model_info(model_dir, threshold_default,
                                             validators={"bertxml": check_bert_dir, "cls": check_bert_dir})
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
        memory) and cut into passes of at most token_budget tokens, each padded to its own longest chunk
        rounded up to a multiple of PASS_WIDTH_MULTIPLE tokens (at most max_len).

        evidence (a "bertxml" model): returns (logits, attended), attended[i] = [(label j, logit, weights
        (len(chunks[i]),) float32)] for every code j whose chunk probability reaches its threshold: eq. 2's
        attention of those codes only, from the same pass's token states (`predicted_attention`).
        """
        # torch only where the model runs, not on the Spark driver (module docstring)
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
                width = min(-(-int(lengths[order[start]]) // PASS_WIDTH_MULTIPLE) * PASS_WIDTH_MULTIPLE,
                            self.max_len)
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
                    hidden = self.model.token_states(ids_t, keep)  # (B, T, H)
                    logits = self.fused_head(self.model.head, hidden, mask_t if padded else None)  # (B, M)
                elif evidence:  # the model's own head, with its token states kept for the evidence
                    hidden = self.model.token_states(ids_t, mask_t)  # (B, T, H)
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
        # torch only where the model runs, not on the Spark driver (module docstring)
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
                    starts, ends = token_offsets(encodings[i])
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


def label_attention_sdpa(head, hidden, attention_mask):
    """The label attention head (paper eq. 2-4, `bertxml.models.bert.LabelAttention`) as ONE fused
    scaled-dot-product-attention call: queries are the label vectors l_j, keys and values the token
    states, scale 1 (eq. 2 has no 1/sqrt(H)). Same logits as the module, without materialising the
    (B, M, T) attention matrix, which at M = 2,292 labels costs more than a small encoder.

    hidden (B, T, H), attention_mask (B, T) or None (no padding: SDPA's faster unmasked path) -> logits (B, M).
    """
    # torch only where the model runs, not on the Spark driver (module docstring)
    import torch.nn.functional as F

    b = hidden.shape[0]
    queries = head.label_vectors.to(hidden.dtype)[None, None].expand(b, 1, -1, -1)  # (B, 1, M, H)
    states = hidden[:, None]  # (B, 1, T, H)
    keep = None if attention_mask is None else attention_mask[:, None, None, :] != 0  # (B, 1, 1, T)
    context = F.scaled_dot_product_attention(queries, states, states, attn_mask=keep, scale=1.0)[:, 0]  # (B, M, H)
    return head.context_logits(context)  # (B, M) eq. 4


def label_attention_blocked(head, hidden, attention_mask, block: int = 256):
    """`label_attention_sdpa` as plain matmuls over blocks of `block` labels, for bf16 on the CPU, where
    the SDPA kernel runs at fp32 speed: each block's (B, block, T) scores stay in cache between the two
    products and the softmax (benchmarks/README.md, "Scoring throughput", has the measurement)."""
    # torch only where the model runs, not on the Spark driver (module docstring)
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
    return head.context_logits(context)  # (B, M) eq. 4


def fused_head_matches(model, device, attend=label_attention_sdpa, tolerance: float = 1e-4) -> bool:
    """Check, once at load, that `attend` (label_attention_sdpa or _blocked) gives the model's own head
    logits on a random padded batch; if the module ever changes (a scale, a bias), the engine falls back."""
    # torch only where the model runs, not on the Spark driver (module docstring)
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
