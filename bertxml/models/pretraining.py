"""The pre-training model (paper §3.2): BERT with the masked language model and next sentence prediction
heads, and BERT's masking rule. `bertxml.training.pretrain` trains it from scratch on the notes; its
`save_encoder` folder is what `bertxml.models.bert.from_pretrained_encoder` fine-tunes.

Shapes: B batch, T tokens, H hidden size, V vocabulary size, N masked positions.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig, BertForPreTraining, BertModel

IGNORE_INDEX = -100  # cross-entropy's "not a target" label, used for unmasked MLM positions


def mask_tokens(input_ids: torch.Tensor, special_mask: torch.Tensor, vocab_size: int, mask_token_id: int,
                probability: float = 0.15, generator: torch.Generator | None = None):
    """BERT's masking rule for the masked language model task.

    Takes input_ids (B, T) and special_mask (B, T), True at special AND padding positions (never chosen).
    Chooses each other position with `probability`; of the chosen, 80% become [MASK], 10% a random token
    and 10% stay as they are (so the model cannot rely on seeing [MASK] to know what to predict).
    Returns (masked_input_ids (B, T), labels (B, T)): labels hold the original id at chosen positions and
    -100 elsewhere. `generator` must live on input_ids' device.
    """
    def draw(p: float) -> torch.Tensor:
        probs = torch.full(input_ids.shape, p, device=input_ids.device)
        return torch.bernoulli(probs, generator=generator).bool()  # (B, T)

    chosen = draw(probability) & ~special_mask.bool()  # (B, T)
    labels = input_ids.masked_fill(~chosen, IGNORE_INDEX)  # (B, T)
    to_mask = draw(0.8) & chosen
    to_random = draw(0.5) & chosen & ~to_mask  # half of the remaining 20%
    random_ids = torch.randint(vocab_size, input_ids.shape, generator=generator, device=input_ids.device)
    masked = input_ids.masked_fill(to_mask, mask_token_id)
    masked = torch.where(to_random, random_ids, masked)  # (B, T)
    return masked, labels


class BertForPretraining(nn.Module):
    """BERT with the masked-LM and next-sentence heads (transformers' `BertForPreTraining`, whose MLM
    decoder is tied to the input word embeddings).

    `forward(input_ids, attention_mask, token_type_ids, mlm_labels, nsp_labels)` returns a dict with
    `mlm_logits` and `nsp_logits` (B, 2); with labels also `mlm_loss` (mean over masked positions),
    `nsp_loss` and `loss`, their sum (either may be left out, e.g. pretraining without NSP).

    Without mlm_labels, `mlm_logits` is (B, T, V). With them it is (N, V), the N masked positions only in
    row-major order: the vocabulary projection is the largest matmul of a small BERT (H x V per token), and
    only the ~15% masked positions enter the loss, so the rest is not computed.
    """

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.model = BertForPreTraining(config)

    @property
    def bert(self) -> BertModel:
        return self.model.bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, mlm_labels: torch.Tensor | None = None,
                nsp_labels: torch.Tensor | None = None) -> dict:
        out = self.model.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        states, pooled = out.last_hidden_state, out.pooler_output  # (B, T, H), (B, H)
        heads = self.model.cls
        result = {"nsp_logits": heads.seq_relationship(pooled)}  # (B, 2)
        if mlm_labels is None:
            result["mlm_logits"] = heads.predictions(states)  # (B, T, V)
        else:
            masked = mlm_labels != IGNORE_INDEX  # (B, T)
            result["mlm_logits"] = heads.predictions(states[masked])  # (N, V)
            # Sum over masked positions / their count: a batch with nothing masked gives 0, not NaN.
            result["mlm_loss"] = F.cross_entropy(result["mlm_logits"].float(), mlm_labels[masked],
                                                 reduction="sum") / masked.sum().clamp(min=1)
        if nsp_labels is not None:
            result["nsp_loss"] = F.cross_entropy(result["nsp_logits"].float(), nsp_labels)
        losses = [result[name] for name in ("mlm_loss", "nsp_loss") if name in result]
        if losses:
            result["loss"] = sum(losses)
        return result

    @torch.no_grad()
    def init_mlm_bias(self, token_counts) -> None:
        """Start the masked-LM output bias at the log unigram frequency of the training tokens (V,), so the
        first steps need not push every token's state towards "predict the frequent tokens": with a zero
        bias they did, and the encoder came out of a short pretraining with nearly one vector for all tokens.
        Tokens never seen get the frequency of one occurrence."""
        counts = torch.as_tensor(token_counts, dtype=torch.float32).clamp(min=1.0)  # (V,)
        bias = self.model.cls.predictions.bias
        if counts.shape != bias.shape:
            raise ValueError(f"got {tuple(counts.shape)} token counts for a vocabulary of {bias.shape[0]}")
        bias.copy_(torch.log(counts / counts.sum()))

    def save_encoder(self, out_dir: str | Path) -> Path:
        """Write a Hugging Face checkpoint directory (config.json + model.safetensors; keys "bert.*" plus
        the "cls.*" heads) that `from_pretrained_encoder` and `BertForPreTraining.from_pretrained` read.
        Returns out_dir as a Path."""
        out_dir = Path(out_dir)
        self.model.save_pretrained(str(out_dir), safe_serialization=True)
        return out_dir
