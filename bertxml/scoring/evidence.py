"""Evidence: the spans of a note that the label attention of each predicted code weighs most, as
character offsets into the note (never its text). The engine calls these in the pass that gives the
probabilities (`BertScorer.score` with evidence_top_k > 0).
"""
from __future__ import annotations

import re

import numpy as np

from bertxml.text.tokenize import chunk_token

# ---- evidence: the label attention of the predicted codes -----------------------------------------------
def predicted_attention(head, hidden, attention_mask, logits, thresholds):
    """Eq. 2's attention weights of the codes each chunk predicts, from a pass's token states.

    The fused head never forms the (B, M, T) attention; this forms it only for the U codes that some chunk
    of the pass predicts (sigmoid(logit) >= threshold): (B, U, T) scores, about U/M of the head's cost,
    with U a few dozen against M in the thousands. Softmax in float32 over the real tokens, as
    `LabelAttention` does. hidden (B, T, H), attention_mask (B, T), logits (B, M) float32, thresholds (M,).
    Yields (row b, code j, logit, weights (T,) float32 numpy incl. [CLS]/[SEP], 0 on padding).
    """
    # torch only where the model runs, not on the Spark driver (see bertxml.scoring.engine)
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


def token_offsets(encoding) -> tuple[np.ndarray, np.ndarray]:
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
