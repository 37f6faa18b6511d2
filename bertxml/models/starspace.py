"""StarSpace input embeddings for the BiGRU baseline (paper §4.3; Wu et al. 2017, TagSpace mode): word
embeddings learnt from the train notes with their codes as labels, then frozen in the BiGRU.
"""
from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn

log = logging.getLogger("bertxml.models.starspace")


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
