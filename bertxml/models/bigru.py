"""The BiGRU baseline with multi-head attention (paper §3.4.2, eq. 5-8), read bottom-up: the attention
pool, then the model over frozen input embeddings (`bertxml.models.starspace`), its folder's weights, and
its predictor (`BiGruPredictor`). Model kind "bilstm", the name the paper's table uses.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
from torch import nn

from bertxml.models import modeldir
from bertxml.models.baselines import BaselinePredictor
from bertxml.models.devices import resolve_device
from bertxml.models.modeldir import CONFIG_FILE, WEIGHTS_FILE
from bertxml.models.precision import autocast
from bertxml.text.data import eval_batches, pad_ids

log = logging.getLogger("bertxml.models.bigru")


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
        # packed sequence, whose CPU backward pass grows with the square of the length.)
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
    out_dir.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_model(model, str(out_dir / WEIGHTS_FILE))
    modeldir.write_json(out_dir / CONFIG_FILE, {**model.config, "max_len": int(max_len)})


def load_bilstm(model_dir: str | Path, device="cpu") -> BiGruAttention:
    arch = json.loads((Path(model_dir) / CONFIG_FILE).read_text())
    model = BiGruAttention(arch["vocab_size"], arch["embed_dim"], arch["hidden_size"], arch["heads"],
                           arch["n_labels"], arch["dropout"], arch["pad_id"])
    safetensors.torch.load_model(model, str(Path(model_dir) / WEIGHTS_FILE), strict=True, device=str(device))
    return model.to(device).eval()


# ---- training ---------------------------------------------------------------------------------------------
@torch.no_grad()
def bilstm_probabilities(model: BiGruAttention, chunks: list[np.ndarray], batch_size: int,
                         device: torch.device, precision=None) -> np.ndarray:
    """(n, M) float32 probabilities of one chunk per note, batches sorted by length (least padding);
    precision: a `bertxml.models.precision.Precision` to autocast with (None: fp32)."""
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


class BiGruPredictor(BaselinePredictor):
    def __init__(self, model_dir, device=None, batch_size: int = 16, num_threads=None, threshold_default=0.5):
        super().__init__(model_dir, device, batch_size, num_threads, threshold_default)
        self.device = torch.device(resolve_device(device))
        self.model = load_bilstm(self.info.model_dir, self.device)

    def probabilities(self, chunks):
        return bilstm_probabilities(self.model, chunks, self.batch_size, self.device)
