"""Tests for the baselines (bertxml/models/logreg.py, bigru.py, starspace.py, bertxml/training/baselines.py)
and bertxml/reports/compare.py: bag-of-words features by hand; the BiGRU's multi-head
attention (eq. 5-8) shapes and masking; each baseline learns the tiny learnable problem of test_train.py (a
code's note holds its signal word) and its folder scores through `bertxml.scoring.predictors.make_predict_fn` with the
predictions it was selected on; `bertxml compare` writes bertxml.model_comparison and Tables 2 and 3.

Run: .venv/bin/python -m pytest -q tests/test_baselines.py
"""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from bertxml.models import modeldir
from bertxml.platform import tables as t
from bertxml.models.bigru import BiGruAttention, MultiHeadAttentionPool
from bertxml.models.logreg import bag_of_words, idf_weights, weight_features
from bertxml.training.baselines import run_train_baseline
from bertxml.reports.compare import comparison_markdown, find_encoder, plan, run_compare
from bertxml.config import Config
from bertxml.metrics import auc_report_from_arrays
from bertxml.models.modeldir import ModelDirError
from bertxml.scoring.predictors import make_predict_fn, read_model_info
from test_train import CODES, assert_no_pickles, make_notes, make_vocab_dir, tiny_config, write_tables

BASE_LEN = 64   # longer than any toy note: a baseline sees the whole note


def baseline_config(**baseline) -> Config:
    cfg = tiny_config()
    settings = dict(max_len=BASE_LEN, embed_dim=16, starspace_epochs=20, starspace_lr=0.05, starspace_batch_size=16,
                    bilstm_hidden_size=16, bilstm_heads=4, bilstm_epochs=12, bilstm_batch_size=8, bilstm_lr=5e-3,
                    logreg_max_iter=100)
    settings.update(baseline)
    for key, value in settings.items():
        setattr(cfg.baseline, key, value)
    return cfg


@pytest.fixture(scope="module")
def toy_wh(spark, tmp_path_factory):
    """(Warehouse, vocab_dir, notes): the toy problem, chunked at BASE_LEN."""
    from bertxml.platform.warehouse import Warehouse

    wh = Warehouse(spark, tmp_path_factory.mktemp("baselines") / "warehouse", baseline_config())
    for db in ("ehr", wh.cfg.warehouse.schema):
        spark.sql(f"DROP DATABASE IF EXISTS `{db}` CASCADE")
    vocab_dir = make_vocab_dir(wh.workdir / "vocab")
    notes = make_notes()
    write_tables(wh, vocab_dir, notes, max_len=BASE_LEN)
    return wh, vocab_dir, notes


def dev_of(notes) -> tuple[list[str], np.ndarray]:
    dev = sorted((n for n in notes if n["split"] == "dev"), key=lambda n: n["note_id"])
    labels = np.array([[code in n["codes"] for code in CODES] for n in dev], dtype=np.int64)
    return [n["text"] for n in dev], labels


# ---------------------------------------------------------------------------------------------------------
# Pieces


def test_bag_of_words_counts_and_tfidf_by_hand():
    counts = bag_of_words([np.array([2, 7, 7, 9, 3]), np.array([2, 9, 3]), np.array([2, 3])], 10, skip_ids=[2, 3])
    assert counts.toarray().tolist() == [[0] * 7 + [2, 0, 1], [0] * 9 + [1], [0] * 10]  # [CLS]/[SEP] left out
    idf = idf_weights(counts)
    assert idf[7] == pytest.approx(np.log(4 / 2) + 1) and idf[9] == pytest.approx(np.log(4 / 3) + 1)
    x = weight_features(counts, idf).toarray()
    a, b = (1 + np.log(2)) * idf[7], idf[9]                       # sublinear tf x idf ...
    assert x[0, [7, 9]] == pytest.approx(np.array([a, b]) / np.hypot(a, b))  # ... L2-normalised
    assert x[1, 9] == pytest.approx(1.0) and not x[2].any()        # an empty note stays all zero
    assert weight_features(counts, None) is counts                 # logreg_tfidf = false: raw counts


def test_multi_head_attention_shapes_masking_and_scale():
    torch.manual_seed(0)
    pool = MultiHeadAttentionPool(state_size=6, heads=3)
    states = torch.randn(2, 5, 6)                                  # (B, T, D)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    context, attention = pool(states, mask)
    assert context.shape == (2, 3 * 6) and attention.shape == (2, 3, 5)
    assert torch.all(attention[1, :, 3:] == 0)                     # padding: exactly zero weight (eq. 5)
    torch.testing.assert_close(attention.sum(-1), torch.ones(2, 3))
    # eq. 6: c_k = sum_i a_ik h_i / sqrt(d_h); eq. 7: heads concatenated
    by_hand = torch.einsum("bkt,btd->bkd", attention, states) / np.sqrt(6)
    torch.testing.assert_close(context, by_hand.reshape(2, 18))
    # whatever sits in the padded states never reaches the context
    noisy = states.clone()
    noisy[1, 3:] = 1e4
    torch.testing.assert_close(pool(noisy, mask)[0], context)


def test_bigru_ignores_padding_and_returns_the_paper_shapes():
    torch.manual_seed(0)
    model = BiGruAttention(vocab_size=30, embed_dim=8, hidden_size=5, heads=3, n_labels=4, dropout=0.1).eval()
    ids = torch.tensor([[2, 11, 12, 13, 3, 0, 0], [2, 14, 3, 0, 0, 0, 0]])
    mask = (ids != 0).long()
    out = model(ids, mask, labels=torch.ones(2, 4), return_attention=True)
    assert out["logits"].shape == (2, 4) and out["attention"].shape == (2, 3, 7) and out["loss"].ndim == 0
    assert model.out.weight.shape == (4, 3 * 2 * 5)                 # W_a: M x K d_h, d_h = 2 x hidden
    assert not model.embed.weight.requires_grad                      # frozen input embeddings
    assert torch.all(out["attention"][0, :, 5:] == 0) and torch.all(out["attention"][1, :, 3:] == 0)
    # the same note with less padding (or alone) gets the same logits: packing + masking
    alone = model(ids[1:, :3], mask[1:, :3])["logits"]
    torch.testing.assert_close(alone, out["logits"][1:], rtol=1e-5, atol=1e-6)


def test_plan_follows_the_paper_rows_and_the_overrides():
    cfg = Config()
    rows = [f"{e.model}@{e.max_len}" for e in plan(cfg)]
    assert rows == ["logreg@512", "bilstm@512", "minilm-bertxml@512", "cls@512", "cls@1024", "bertxml@512",
                    "bertxml@1024"]
    assert [f"{e.model}@{e.max_len}" for e in plan(cfg, "bertxml,logreg", "1024")] == ["logreg@512", "bertxml@1024"]
    cfg.compare.baseline_max_len, cfg.compare.minilm_head = 0, "cls"
    rows = [f"{e.model}@{e.max_len}" for e in plan(cfg, ["bilstm", "minilm"], [256])]
    assert rows == ["bilstm@256", "minilm-cls@256"]
    with pytest.raises(ValueError, match="unknown model"):
        plan(cfg, "bert")


def test_cli_takes_compare_and_the_baselines():
    from bertxml.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["compare", "--workdir", "w", "--models", "logreg,bertxml", "--max-lens", "512,1024",
                              "--split", "test", "--encoder", "e", "--set", "compare.bert_max_steps=5"])
    assert (args.models, args.max_lens, args.split, args.encoder, args.set) == (
        "logreg,bertxml", "512,1024", "test", "e", ["compare.bert_max_steps=5"])
    assert parser.parse_args(["train", "--model", "bilstm"]).model == "bilstm"


def test_no_encoder_is_said_plainly(tmp_path):
    with pytest.raises(FileNotFoundError, match="no pretrained encoder under .*run `bertxml pretrain`"):
        find_encoder(tmp_path)


def test_markdown_tables_have_the_papers_shape():
    rows = [{"model": "logreg", "max_len": 512, "label": "Logistic Reg (max length 512)", "micro_auc": 0.9,
             "macro_auc": 0.8, "macro_auc_low_freq": 0.7, "n_codes_scored": 10, "n_codes_low_freq": 4,
             "n_notes": 50, "train_seconds": 3.0, "parameters": 12345},
            {"model": "bertxml", "max_len": 1024, "label": "EHR BERT + XML (max length 1024)", "micro_auc": 0.95,
             "macro_auc": 0.85, "macro_auc_low_freq": 0.9, "n_codes_scored": 10, "n_codes_low_freq": 4,
             "n_notes": 50, "train_seconds": 30.0, "parameters": 2_500_000}]
    md = comparison_markdown(rows, "dev", 2000, "compare-x")
    assert "| Logistic Reg (max length 512) | 0.900 | 0.800 | 10 | 3 | 12K |" in md
    assert "| EHR BERT + XML (max length 1024) | 0.950 | 0.850 | 10 | 30 | 2.5M |" in md
    table3 = md.split("Table 3")[1]
    assert "fewer than 2,000 train notes" in table3
    assert "| Logistic Reg (max length 512) | 0.700 | 4 | 0.800 |" in table3
    assert "| EHR BERT + XML (max length 1024) | 0.900 | 4 | 0.850 |" in table3


# ---------------------------------------------------------------------------------------------------------
# Each baseline learns, and its folder scores as it was measured


def check_folder(out: Path, kind: str, notes) -> dict:
    manifest = modeldir.load_manifest(out)
    assert set(modeldir.MANIFEST_KEYS) <= set(manifest) and manifest["model_kind"] == kind
    assert manifest["max_len"] == BASE_LEN and manifest["parameters"] > 0 and manifest["train_seconds"] > 0
    assert set(manifest["inputs"]) == {"bertxml.labeled_notes", "bertxml.label_vocab", "bertxml.chunks"}
    assert sorted(p.name for p in out.iterdir()) == ["drift_profile.json", "label_vocab.json", "manifest.json",
                                                     "model.safetensors", "model_config.json",
                                                     "operating_points.json", "thresholds.json", "tokenizer.json"]
    assert_no_pickles(out)
    assert manifest["dev_metrics"]["macro_auc"] > 0.7, manifest["dev_metrics"]   # far better than chance
    assert [r["code"] for r in modeldir.load_label_vocab(out)] == CODES
    # the folder, through the nightly scorer's own entry point, reproduces the dev AUC it was selected on
    info = read_model_info(out)
    assert info.model_kind == kind and info.n_labels == len(CODES)
    texts, labels = dev_of(notes)
    predict = make_predict_fn(out, "cpu", batch_size=4, max_chunks_per_note=8)
    probs = predict(texts)
    assert probs.shape == (len(texts), len(CODES)) and probs.dtype == np.float32
    report = auc_report_from_arrays(labels, probs, [10] * len(CODES))
    assert report["macro_auc"] == pytest.approx(manifest["dev_metrics"]["macro_auc"], abs=1e-6)
    np.testing.assert_allclose(make_predict_fn(out, "cpu")(texts), probs, atol=1e-6)  # other batches, same scores
    scored = predict.score(texts + [""])
    assert scored.n_tokens[-1] == 0 and not scored.truncated.any()
    return manifest


def test_logreg_learns_and_scores_through_make_predict_fn(toy_wh, tmp_path):
    wh, _, notes = toy_wh
    out = run_train_baseline(wh, baseline_config(), "logreg", out_dir=tmp_path / "logreg")
    manifest = check_folder(out, "logreg", notes)
    assert manifest["train_notes"] == 64 and manifest["train_sample_seed"] is None
    arch = json.loads((out / "model_config.json").read_text())
    assert arch["n_labels"] == len(CODES) and arch["tfidf"] is True

    sampled = run_train_baseline(wh, baseline_config(logreg_max_train_notes=40), "logreg", out_dir=tmp_path / "s")
    manifest = modeldir.load_manifest(sampled)
    assert manifest["train_notes"] == 40 and manifest["train_notes_in_split"] == 64
    assert manifest["train_sample_seed"] == 13


def test_logreg_chooses_its_regularisation_on_dev(toy_wh, tmp_path):
    """baseline.logreg_c_grid: every C is fit, the best dev macro AUC is kept, the folder says which and
    scores as the refit at that C alone."""
    wh, _, notes = toy_wh
    grid = [0.001, 1.0, 100.0]
    out = run_train_baseline(wh, baseline_config(logreg_c_grid=grid), "logreg", out_dir=tmp_path / "grid")
    manifest = modeldir.load_manifest(out)
    aucs = {float(c): auc for c, auc in manifest["c_grid_dev_macro_auc"].items()}
    assert sorted(aucs) == grid and manifest["c"] == max(aucs, key=aucs.get)
    assert len(set(aucs.values())) > 1  # the grid's fits differ on dev: the choice is a real one
    assert json.loads((out / "model_config.json").read_text())["c"] == manifest["c"]
    alone = run_train_baseline(wh, baseline_config(logreg_c=manifest["c"]), "logreg", out_dir=tmp_path / "alone")
    assert modeldir.load_manifest(alone)["dev_metrics"]["macro_auc"] == pytest.approx(aucs[manifest["c"]])
    assert manifest["dev_metrics"]["macro_auc"] == pytest.approx(aucs[manifest["c"]])


def test_bilstm_learns_and_scores_through_make_predict_fn(toy_wh, tmp_path):
    wh, _, notes = toy_wh
    out = run_train_baseline(wh, baseline_config(), "bilstm", out_dir=tmp_path / "bilstm")
    manifest = check_folder(out, "bilstm", notes)
    assert manifest["trainable_parameters"] < manifest["parameters"]   # the embeddings are frozen
    assert manifest["dev_metrics"]["best_step"] is not None


def test_a_folder_with_the_wrong_label_count_is_refused(toy_wh, tmp_path):
    wh, _, _ = toy_wh
    out = run_train_baseline(wh, baseline_config(), "logreg", out_dir=tmp_path / "m")
    labels = json.loads((out / "label_vocab.json").read_text())
    (out / "label_vocab.json").write_text(json.dumps(labels + [{**labels[0], "label_index": 4, "code": "Z99.9"}]))
    with pytest.raises(ModelDirError, match="5 codes"):
        read_model_info(out)


# ---------------------------------------------------------------------------------------------------------
# bertxml compare


def make_encoder(wh, vocab_dir: Path, cfg: Config) -> Path:
    """A random tiny encoder folder, as `bertxml pretrain` lays one out (no pretraining: this is about plumbing)."""
    from bertxml.models.bert import bert_config
    from bertxml.models.pretraining import BertForPretraining

    version, out = modeldir.new_model_dir(wh.workdir, "encoder", "test")
    torch.manual_seed(0)
    BertForPretraining(bert_config(cfg.model, 200, 0)).save_encoder(out)
    modeldir.write_model_dir(out, model_version=version, model_kind=modeldir.ENCODER_KIND, config=cfg.to_dict(),
                             inputs={}, max_len=BASE_LEN, dev_metrics={}, parameters=0, train_seconds=0.0,
                             tokenizer_file=vocab_dir / "tokenizer.json")
    return out


def test_compare_writes_the_comparison_table(toy_wh):
    wh, vocab_dir, _ = toy_wh
    cfg = baseline_config(bilstm_epochs=2, starspace_epochs=2)
    cfg.train.epochs, cfg.compare.bert_max_steps, cfg.compare.baseline_max_len = 1, 2, BASE_LEN
    cfg.compare.max_notes = 20                     # of the 24 dev notes: the same 20 for every model
    make_encoder(wh, vocab_dir, cfg)
    # the BERT rows at 32 tokens, which the chunks table lacks: compare tokenizes first
    result = run_compare(wh, cfg, models="logreg,bilstm,cls,bertxml", max_lens="32", split="dev")
    assert [(r["model"], r["max_len"]) for r in result["rows"]] == [
        ("logreg", BASE_LEN), ("bilstm", BASE_LEN), ("cls", 32), ("bertxml", 32)]
    comparison = wh.table(wh.name(t.MODEL_COMPARISON))
    assert comparison.columns == [f.name for f in t.MODEL_COMPARISON_SCHEMA.fields]
    assert {"model", "max_len", "micro_auc", "macro_auc", "macro_auc_low_freq", "n_codes", "train_seconds",
            "parameters", "model_version"} <= set(comparison.columns)
    rows = {(r["model"], r["max_len"]): r for r in comparison.collect()}
    assert set(rows) == {("logreg", BASE_LEN), ("bilstm", BASE_LEN), ("cls", 32), ("bertxml", 32)}
    for r in rows.values():
        assert r["run_id"] == result["run_id"] and r["dataset"] == "dev" and r["n_notes"] == 20
        assert 0.0 <= r["micro_auc"] <= 1.0 and r["n_codes"] == len(CODES) and r["parameters"] > 0
        assert Path(r["model_dir"]).parent == wh.workdir / "compare" / result["run_id"]   # not WORKDIR/models
        assert json.loads(r["inputs"])["bertxml.labeled_notes"] == wh.version(wh.name(t.LABELED_NOTES))
    assert rows[("logreg", BASE_LEN)]["macro_auc"] > 0.7
    assert rows[("cls", 32)]["initialised_from"].startswith(str(wh.workdir / "models" / "encoder-test"))
    chunk_lengths = {r[0] for r in wh.table(wh.name(t.CHUNKS)).select("max_len").distinct().collect()}
    assert chunk_lengths == {BASE_LEN, 32}
    md = Path(result["report_dir"], "comparison.md").read_text()
    assert md == result["markdown"] and "| EHR BERT + XML (max length 32) |" in md and "Table 3" in md
    # each comparison folder is a model folder the scorer takes
    assert read_model_info(rows[("bilstm", BASE_LEN)]["model_dir"]).model_kind == "bilstm"


def test_compare_keeps_the_other_rows_when_a_model_fails(toy_wh, tmp_path):
    wh, vocab_dir, _ = toy_wh
    cfg = baseline_config()
    cfg.compare.baseline_max_len = BASE_LEN
    broken = tmp_path / "encoder-broken"
    shutil.copytree(make_encoder(wh, vocab_dir, cfg), broken)
    (broken / "model.safetensors").unlink()                        # an encoder folder without its weights
    name = wh.name(t.MODEL_COMPARISON)
    before = {r[0] for r in wh.table(name).select("run_id").distinct().collect()} if wh.exists(name) else set()
    with pytest.raises(RuntimeError, match=r"1 of 2 models failed \(cls@32\)"):
        run_compare(wh, cfg, models="logreg,cls", max_lens="32", encoder_dir=broken)
    new = [r for r in wh.table(name).collect() if r["run_id"] not in before]
    assert [(r["model"], r["max_len"]) for r in new] == [("logreg", BASE_LEN)]
