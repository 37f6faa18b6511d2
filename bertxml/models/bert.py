"""BERT-XML models: the multi-label attention head, the [CLS] head, and the task models around a BERT encoder.

Paper: "BERT-XML: Large Scale Automated ICD Coding Using BERT Pretraining", §3.3 and §4.2.1.
Read bottom-up: helpers and weight init, the label attention (eq. 2-4), the [CLS] head (eq. 1), the ICD
coding model (`BertForIcdCoding`) with its checkpoint helpers, and last the note-level pooling of chunk
predictions. The pre-training model (§3.2: masked LM + next sentence prediction) is
`bertxml.models.pretraining`.

Every model returns logits, never probabilities: the sigmoid of eq. 1 and eq. 4 lives in the loss
(`BCEWithLogits`, numerically stable) and in scoring. Checkpoints are safetensors only, never pickle.

Shapes: B batch, T tokens, H hidden size, M labels (ICD codes), V vocabulary size.
"""
from __future__ import annotations

import json
import logging
from functools import partial
from pathlib import Path
from typing import Iterable

import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig, BertModel

from bertxml.config import ModelConfig
from bertxml.models.modeldir import CONFIG_FILE, WEIGHTS_FILE

logger = logging.getLogger("bertxml.models.bert")

HEADS = ("bertxml", "cls")
LABEL_OUTPUTS = ("shared", "per_label")  # model.label_output: eq. 4's W_a shared by all codes, or one per code


def bert_config(cfg: ModelConfig, vocab_size: int, pad_token_id: int = 0) -> BertConfig:
    """Build the transformers `BertConfig` for a from-scratch encoder (paper Table 1) from a `ModelConfig`.

    Takes the model section of the project config, the WordPiece vocabulary size and the [PAD] id.
    Returns a BertConfig using PyTorch's scaled-dot-product attention and two token types (the two
    segments of next sentence prediction).
    """
    if cfg.max_len > cfg.max_position_embeddings:
        raise ValueError(f"max_len {cfg.max_len} exceeds max_position_embeddings {cfg.max_position_embeddings}")
    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_position_embeddings,
        hidden_act=cfg.hidden_act,
        hidden_dropout_prob=cfg.hidden_dropout_prob,
        attention_probs_dropout_prob=cfg.attention_probs_dropout_prob,
        type_vocab_size=2,
        pad_token_id=pad_token_id,
        attn_implementation="sdpa",
    )


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """The one place the heads are initialised: BERT's rule, normal(0, initializer_range) weights and zero
    biases, so a head starts on the same scale as the encoder it sits on. The encoder itself is
    initialised by transformers (`BertModel.post_init`). Use as `head.apply(partial(init_weights, std=...))`.
    """
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, mean=0.0, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, LabelAttention):
        nn.init.normal_(module.label_vectors, mean=0.0, std=std)
        if module.output_kind == "per_label":
            nn.init.normal_(module.label_outputs, mean=0.0, std=std)


# ---------------------------------------------------------------------------------------------------------
# Heads


class LabelAttention(nn.Module):
    """Multi-label attention output layer of BERT-XML (paper §3.3.2, eq. 2-4, after AttentionXML).

    Each label j has its own attention vector l_j over the tokens, so each ICD code reads the part of the
    note that speaks about it instead of sharing one [CLS] vector among thousands of codes:

        a_ij = softmax_i(<h_i, l_j>)          (eq. 2; padding masked out)
        c_j  = sum_i a_ij h_i                 (eq. 3)
        y_j  = W_a relu(W_b c_j)              (eq. 4, returned as a logit: no sigmoid)

    W_b (H -> H) is shared by all labels. With output="shared" (the paper) so is W_a (H -> 1): a code's
    score then differs from another's only through what it attends to. With output="per_label" each code
    has its own output vector and bias, y_j = <u_j, relu(W_b c_j)> + b_j (as LAAT and CAML read the
    context), so a code can also weigh what it reads its own way; M x (H + 1) more parameters.
    """

    def __init__(self, hidden: int, n_labels: int, initializer_range: float = 0.02, output: str = "shared"):
        super().__init__()
        if output not in LABEL_OUTPUTS:
            raise ValueError(f"unknown model.label_output {output!r}; choose one of {LABEL_OUTPUTS}")
        self.output_kind = output
        self.label_vectors = nn.Parameter(torch.empty(n_labels, hidden))  # L = {l_0 .. l_M}, (M, H)
        self.w_b = nn.Linear(hidden, hidden)
        if output == "shared":
            self.w_a = nn.Linear(hidden, 1)
        else:
            self.label_outputs = nn.Parameter(torch.empty(n_labels, hidden))  # u_j, (M, H)
            self.label_bias = nn.Parameter(torch.zeros(n_labels))  # b_j, (M,)
        self.apply(partial(init_weights, std=initializer_range))

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor, return_attention: bool = False):
        """hidden (B, T, H) last-layer states, attention_mask (B, T) with 1 for real tokens and 0 for padding.

        Returns logits (B, M), or (logits, attention (B, M, T)) with `return_attention=True`.
        """
        scores = torch.einsum("bth,mh->bmt", hidden, self.label_vectors)  # (B, M, T) eq. 2 numerator logits
        # The softmax runs in float32 even under bf16 autocast: over 1,024 tokens bf16's 8-bit mantissa
        # makes the weights visibly coarse. Padding is filled with finfo.min (not -inf) BEFORE the softmax:
        # exp(finfo.min - max) underflows to exactly 0, and a row with no real token stays finite (uniform)
        # instead of NaN.
        scores = scores.float()
        is_pad = attention_mask[:, None, :] == 0  # (B, 1, T)
        scores = scores.masked_fill(is_pad, torch.finfo(torch.float32).min)
        attention = scores.softmax(dim=-1).to(hidden.dtype)  # (B, M, T) eq. 2, rows sum to 1
        context = torch.bmm(attention, hidden)  # (B, M, H) eq. 3
        logits = self.context_logits(context)
        if return_attention:
            return logits, attention
        return logits

    def context_logits(self, context: torch.Tensor) -> torch.Tensor:
        """Label contexts c_j (B, M, H) -> logits (B, M): eq. 4 before the sigmoid. The scoring engine's
        fused attention ends here too."""
        reading = F.relu(self.w_b(context))  # (B, M, H)
        if self.output_kind == "shared":
            return self.w_a(reading).squeeze(-1)
        # in float32, as the loss: a bf16 sum over H would round every logit to 8 bits of mantissa
        return (reading.float() * self.label_outputs.float()).sum(dim=-1) + self.label_bias.float()  # (B, M)


class ClsHead(nn.Module):
    """Standard BERT multi-label output (paper §3.3.1, eq. 1): y = W_out h_cls, returned as logits."""

    def __init__(self, hidden: int, n_labels: int, dropout: float = 0.1, initializer_range: float = 0.02):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(hidden, n_labels)
        self.apply(partial(init_weights, std=initializer_range))

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """hidden (B, T, H) with [CLS] at position 0 -> logits (B, M). The mask is unused ([CLS] is never pad)."""
        h_cls = hidden[:, 0]  # (B, H)
        return self.out(self.dropout(h_cls))  # (B, M)


# ---------------------------------------------------------------------------------------------------------
# ICD coding model


class BertForIcdCoding(nn.Module):
    """A BERT encoder with an ICD multi-label head: "bertxml" (label attention) or "cls" (eq. 1).

    `forward(input_ids (B, T), attention_mask (B, T), labels (B, M) or None, return_attention=False)`
    returns a dict: `logits` (B, M); `loss` (mean binary cross-entropy with logits) when labels are given;
    `attention` (B, M, T) when asked for (bertxml head only).
    """

    def __init__(self, config: BertConfig, n_labels: int, head: str = "bertxml", label_output: str = "shared",
                 state_layers: int = 1):
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"unknown head {head!r}; choose one of {HEADS}")
        if n_labels < 1:
            raise ValueError(f"n_labels must be positive, got {n_labels}")
        if not 1 <= state_layers <= config.num_hidden_layers + 1:
            raise ValueError(f"model.state_layers {state_layers}: between 1 and the encoder's "
                             f"{config.num_hidden_layers} layers + its embeddings")
        self.state_layers = state_layers
        self.config = config
        self.n_labels = n_labels
        self.head_type = head
        self.label_output = label_output if head == "bertxml" else "shared"
        # No pooler: eq. 1 uses h_cls itself, and the label attention reads every token.
        self.bert = BertModel(config, add_pooling_layer=False)
        if head == "bertxml":
            self.head = LabelAttention(config.hidden_size, n_labels, config.initializer_range, label_output)
        else:
            self.head = ClsHead(config.hidden_size, n_labels, config.hidden_dropout_prob, config.initializer_range)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, return_attention: bool = False) -> dict:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.token_states(input_ids, attention_mask)  # (B, T, H)
        out = {}
        if return_attention:
            if self.head_type != "bertxml":
                raise ValueError(f"return_attention needs the 'bertxml' head, this model has {self.head_type!r}")
            logits, out["attention"] = self.head(hidden, attention_mask, return_attention=True)  # (B, M, T)
        else:
            logits = self.head(hidden, attention_mask)  # (B, M)
        out["logits"] = logits
        if labels is not None:
            # float32 loss: the sigmoid of eq. 1/4 folded into a stable BCE, averaged over notes and codes
            out["loss"] = F.binary_cross_entropy_with_logits(logits.float(), labels.float())
        return out

    def token_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """The token states the head reads (B, T, H): the encoder's last layer, or with state_layers = k the
        mean of its last k layers (the embeddings count as layer 0). A sentence-similarity encoder such as
        MiniLM tunes its last layer for mean pooling; the layers below it keep more of each token. The
        attention mask is passed on as given (2-D, or the engine's (B, 1, 1, T) booleans)."""
        if self.state_layers == 1:
            return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        layers = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                           output_hidden_states=True).hidden_states[-self.state_layers:]
        return torch.stack(layers).mean(dim=0)

    @torch.no_grad()
    def init_output_bias(self, label_rates) -> None:
        """Start the head's output bias at the log-odds of the labels' training frequency.

        label_rates (M,): the share of training chunks carrying each code. A head starting at logit 0
        predicts 0.5 for codes that are on a few percent of notes; its first, large gradients then push
        every token's state the same way, and a small encoder collapses to one vector for all tokens
        (its predictions then no longer depend on the note). The [CLS] head and the per-label label
        attention have a bias per code; the paper's label attention shares W_a among all codes (eq. 4), so
        it starts at the mean frequency.
        """
        rates = torch.as_tensor(label_rates, dtype=torch.float32).clamp(1e-4, 1 - 1e-4)  # (M,)
        if rates.shape != (self.n_labels,):
            raise ValueError(f"got {tuple(rates.shape)} label rates for {self.n_labels} labels")
        log_odds = torch.log(rates / (1 - rates))  # (M,)
        if self.head_type == "cls":
            self.head.out.bias.copy_(log_odds)
        elif self.head.output_kind == "per_label":
            self.head.label_bias.copy_(log_odds)
        else:
            mean = rates.mean()
            self.head.w_a.bias.fill_(float(torch.log(mean / (1 - mean))))

    def head_parameters(self) -> list[nn.Parameter]:
        """The ICD head's parameters (trained from scratch, while the encoder may come pretrained)."""
        return list(self.head.parameters())

    @torch.no_grad()
    def init_label_embeddings(self, description_token_ids: list[list[int]], skip_ids: Iterable[int] = ()) -> int:
        """Semantic label embedding (paper §3.3.2): l_j = mean of the encoder's input word embeddings of the
        tokens of code j's description.

        Takes one token-id list per label, in label order; [PAD] and any id in `skip_ids` (e.g. [CLS],
        [SEP]) are left out of the mean; a description with no token left keeps its random l_j.
        Returns the number of labels initialised. Randomly initialised attention is slow to start
        learning; starting from the descriptions is what the paper credits for stable training.
        """
        if self.head_type != "bertxml":
            raise ValueError(f"label embeddings need the 'bertxml' head, this model has {self.head_type!r}")
        if len(description_token_ids) != self.n_labels:
            raise ValueError(f"got {len(description_token_ids)} descriptions for {self.n_labels} labels")
        skip = set(skip_ids) | ({self.config.pad_token_id} if self.config.pad_token_id is not None else set())
        words = self.bert.embeddings.word_embeddings.weight  # (V, H)
        done = 0
        for j, ids in enumerate(description_token_ids):
            keep = [int(i) for i in ids if int(i) not in skip]
            if not keep:
                continue
            if max(keep) >= words.shape[0] or min(keep) < 0:
                raise ValueError(f"description {j} has a token id outside the vocabulary of {words.shape[0]}")
            index = torch.tensor(keep, dtype=torch.long, device=words.device)
            self.head.label_vectors[j] = words[index].mean(dim=0).to(self.head.label_vectors.dtype)  # (H,)
            done += 1
        logger.info("label vectors from descriptions: %d of %d (the rest stay random)", done, self.n_labels)
        return done


    @torch.no_grad()
    def init_label_embeddings_contextual(self, description_token_ids: list[list[int]], skip_ids: Iterable[int] = (),
                                         batch_size: int = 64) -> int:
        """Semantic label embedding from the encoder's output (paper §3.3.2, "the BERT encoding of its
        description"): l_j = mean of the LAST layer's states over the tokens of code j's description, the
        description read whole by the encoder (with its [CLS]/[SEP] around it), special tokens and padding
        left out of the mean. Unlike the input word embeddings, these vectors live in the space the
        attention scores them in (eq. 2), so a code starts by attending to the tokens whose states resemble
        its description. A description with no token left keeps its random l_j. Returns the number set."""
        if self.head_type != "bertxml":
            raise ValueError(f"label embeddings need the 'bertxml' head, this model has {self.head_type!r}")
        if len(description_token_ids) != self.n_labels:
            raise ValueError(f"got {len(description_token_ids)} descriptions for {self.n_labels} labels")
        pad = self.config.pad_token_id if self.config.pad_token_id is not None else 0
        skip = set(skip_ids) | {pad}
        limit = self.config.max_position_embeddings
        vocab = self.config.vocab_size
        was_training = self.training
        self.eval()
        device = self.head.label_vectors.device
        done = 0
        order = [j for j, ids in enumerate(description_token_ids) if any(int(i) not in skip for i in ids)]
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            seqs = [[int(i) for i in description_token_ids[j]][:limit] for j in rows]
            for seq in seqs:
                if max(seq) >= vocab or min(seq) < 0:
                    raise ValueError(f"a description has a token id outside the vocabulary of {vocab}")
            width = max(len(seq) for seq in seqs)
            ids = torch.full((len(seqs), width), pad, dtype=torch.long)  # (B, T)
            for k, seq in enumerate(seqs):
                ids[k, :len(seq)] = torch.tensor(seq)
            attention = (ids != pad).long()
            keep = attention.clone()
            for i in skip - {pad}:
                keep[ids == i] = 0  # (B, T) the description's word pieces only
            ids, attention, keep = ids.to(device), attention.to(device), keep.to(device)
            states = self.token_states(ids, attention).float()  # (B, T, H)
            weights = keep.float()[..., None]
            means = (states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)  # (B, H)
            self.head.label_vectors[torch.tensor(rows, device=device)] = means.to(self.head.label_vectors.dtype)
            done += len(rows)
        self.train(was_training)
        logger.info("label vectors from the encoded descriptions: %d of %d (the rest stay random)", done, self.n_labels)
        return done


def save_model(model: BertForIcdCoding, out_dir: str | Path) -> Path:
    """Write `model.safetensors` (weights, no pickle) and `model_config.json` (BertConfig, head, n_labels)
    to out_dir, creating it. Returns out_dir as a Path. `load_model` reads it back.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"bert_config": model.config.to_dict(), "head": model.head_type, "n_labels": model.n_labels,
            "label_output": model.label_output, "state_layers": model.state_layers}
    (out_dir / CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
    # save_model (not save_file) de-duplicates shared tensors, which save_file refuses.
    safetensors.torch.save_model(model, str(out_dir / WEIGHTS_FILE), metadata={"format": "pt"})
    return out_dir


def load_model(out_dir: str | Path, device: str | torch.device = "cpu") -> BertForIcdCoding:
    """Rebuild a `BertForIcdCoding` saved by `save_model` and load its weights strictly.

    Returns the model on `device`, in eval mode (call `.train()` to fine-tune further).
    """
    out_dir = Path(out_dir)
    meta = json.loads((out_dir / CONFIG_FILE).read_text())
    config = BertConfig.from_dict(meta["bert_config"], attn_implementation="sdpa")
    model = BertForIcdCoding(config, n_labels=meta["n_labels"], head=meta["head"],  # older folders: the paper's
                             label_output=meta.get("label_output", "shared"), state_layers=meta.get("state_layers", 1))
    safetensors.torch.load_model(model, out_dir / WEIGHTS_FILE, strict=True)
    return model.to(device).eval()


def _extend_positions(table: torch.Tensor, n_positions: int, std: float) -> torch.Tensor:
    """Position table (P, H) -> (n_positions, H): the first P rows copied, the rest drawn from
    normal(0, std) - how the paper takes 512-position BERTs to 1,024 tokens (§4.2.1)."""
    extra = torch.empty(n_positions - table.shape[0], table.shape[1], dtype=table.dtype)
    nn.init.normal_(extra, mean=0.0, std=std)
    return torch.cat([table, extra], dim=0)  # (n_positions, H)


def encoder_depth(checkpoint_layers: int, cfg: ModelConfig, source: str | Path = "the checkpoint") -> int:
    """The layers a fine-tuned model keeps of a pretrained encoder with `checkpoint_layers`:
    cfg.encoder_layers when set (> 0), else all of them. Raises ValueError when it asks for more."""
    if not cfg.encoder_layers:
        return checkpoint_layers
    if not 1 <= cfg.encoder_layers <= checkpoint_layers:
        raise ValueError(f"model.encoder_layers {cfg.encoder_layers}: {source} has {checkpoint_layers} layers")
    return cfg.encoder_layers


def from_pretrained_encoder(encoder_dir: str | Path, cfg: ModelConfig, n_labels: int,
                            max_position_embeddings: int = 1024) -> BertForIcdCoding:
    """Build a `BertForIcdCoding` whose encoder comes from a Hugging Face BERT checkpoint directory
    (config.json + model.safetensors): our own `bertxml.models.pretraining.BertForPretraining.save_encoder`
    output (keys prefixed "bert.", MLM/NSP heads ignored) or a plain BertModel such as MiniLM (no prefix).

    The architecture comes from the checkpoint's config.json; from `cfg` come the head and the dropout
    rates, and `cfg.encoder_layers` (> 0) keeps only the checkpoint's first layers: the layers above the
    ones the head reads are never loaded nor run. A checkpoint with fewer than `max_position_embeddings`
    positions is extended (§4.2.1).
    The head is freshly initialised; call `init_label_embeddings` for semantic label init.
    Raises ValueError when an encoder weight is missing or has the wrong shape. Returns the model.
    """
    encoder_dir = Path(encoder_dir)
    config = BertConfig.from_dict(json.loads((encoder_dir / "config.json").read_text()), attn_implementation="sdpa")
    config.hidden_dropout_prob = cfg.hidden_dropout_prob
    config.attention_probs_dropout_prob = cfg.attention_probs_dropout_prob
    ckpt_positions = config.max_position_embeddings
    config.max_position_embeddings = max(ckpt_positions, max_position_embeddings)
    if cfg.max_len > config.max_position_embeddings:
        raise ValueError(f"max_len {cfg.max_len} exceeds the {config.max_position_embeddings} positions")
    config.num_hidden_layers = encoder_depth(config.num_hidden_layers, cfg, encoder_dir)
    model = BertForIcdCoding(config, n_labels=n_labels, head=cfg.head, label_output=cfg.label_output,
                             state_layers=cfg.state_layers)

    expected = model.bert.state_dict()
    loaded, ignored = {}, []
    for key, tensor in safetensors.torch.load_file(str(encoder_dir / WEIGHTS_FILE)).items():
        name = key.removeprefix("bert.")
        if name not in expected:
            ignored.append(key)  # MLM/NSP heads, the pooler, position_ids buffers of older transformers, cut layers
            continue
        if name == "embeddings.position_embeddings.weight" and tensor.shape[0] < config.max_position_embeddings:
            tensor = _extend_positions(tensor, config.max_position_embeddings, config.initializer_range)
            logger.info("position embeddings extended from %d to %d", ckpt_positions, config.max_position_embeddings)
        if tensor.shape != expected[name].shape:
            raise ValueError(f"{key}: checkpoint shape {tuple(tensor.shape)} != model {tuple(expected[name].shape)}")
        loaded[name] = tensor
    missing = sorted(set(expected) - set(loaded))
    cut = [k for k in ignored if k.removeprefix("bert.").startswith("encoder.layer.")]
    logger.info("encoder from %s: %d tensors loaded, %d ignored %s%s", encoder_dir, len(loaded), len(ignored),
                [k for k in ignored if k not in cut], f" and {len(cut)} of the layers cut off" if cut else "")
    logger.debug("encoder tensors loaded: %s", sorted(loaded))
    if missing:
        logger.error("encoder weights missing from %s: %s", encoder_dir, missing)
        raise ValueError(f"encoder checkpoint {encoder_dir} lacks {len(missing)} weights, e.g. {missing[:3]}")
    model.bert.load_state_dict(loaded, strict=True)
    return model


# ---------------------------------------------------------------------------------------------------------
# Notes and parameters


def chunk_max(scores: torch.Tensor, note_index: torch.Tensor, n_notes: int | None = None) -> torch.Tensor:
    """Note-level scores from chunk-level ones: the MAX over a note's chunks (paper §4.1).

    Takes scores (n_chunks, M), logits or probabilities (the sigmoid is monotonic, so max commutes with
    it), and note_index (n_chunks,), the note 0..n_notes-1 each chunk came from. Returns (n_notes, M);
    n_notes defaults to note_index.max() + 1, and a note with no chunk gets -inf.
    """
    if n_notes is None:
        n_notes = int(note_index.max()) + 1 if note_index.numel() else 0
    out = torch.full((n_notes, scores.shape[1]), float("-inf"), dtype=scores.dtype, device=scores.device)
    index = note_index.long()[:, None].expand_as(scores)  # (n_chunks, M)
    return out.scatter_reduce(0, index, scores, reduce="amax", include_self=True)  # (n_notes, M)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters in model (shared tensors, e.g. the tied MLM decoder, counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
