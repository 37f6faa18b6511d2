"""Tests of the GPU path (marked `gpu`, skipped without CUDA): the model in bf16 on CUDA, the label
attention's fp32 softmax under autocast, and the scorer on CUDA against the CPU fp32 engine. Plus one cheap
test, run everywhere, that benchmarks/gpu_check.sh skips cleanly on a machine without a GPU.

Run: .venv/bin/python -m pytest -q -m gpu tests/test_gpu.py   (on a GPU machine; or bash benchmarks/gpu_check.sh)

BERTXML_GPU_TESTS_ON=cpu runs the gpu-marked tests on the CPU (bf16 autocast there is slow but works on
these tiny tensors): the dry run of gpu_check.sh uses it to check the tests' own logic without a GPU.
"""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bertxml.config import ModelConfig
from bertxml.models.bert import BertForIcdCoding, LabelAttention, bert_config
from bertxml.models.precision import autocast, decide_precision
from bertxml.scoring.predictors import make_predict_fn
from bertxml.training.loop import make_optimizer
from test_score import LONG, SENTENCES, make_model_dir

ROOT = Path(__file__).resolve().parent.parent
DEVICE = "cpu" if os.environ.get("BERTXML_GPU_TESTS_ON") == "cpu" else "cuda"
needs_device = pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(),
                                  reason="no CUDA device (run bash benchmarks/gpu_check.sh on a GPU machine)")


def tiny_model(n_labels: int = 5) -> BertForIcdCoding:
    torch.manual_seed(0)
    mcfg = ModelConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       max_position_embeddings=64, max_len=16, hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0)
    return BertForIcdCoding(bert_config(mcfg, 99), n_labels, "bertxml")


@pytest.mark.gpu
@needs_device
def test_forward_backward_in_bf16_learns():
    precision = decide_precision(DEVICE, "true")           # bf16 autocast, as training uses on a GPU
    model = tiny_model().to(DEVICE).train()
    optimizer = make_optimizer(model, 1e-2, 0.0)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 99, (8, 16), generator=gen).to(DEVICE)
    mask = torch.ones_like(ids)
    mask[4:, 10:] = 0                                       # padded rows too
    labels = (torch.rand(8, 5, generator=gen) < 0.3).float().to(DEVICE)
    losses = []
    for _ in range(10):
        with autocast(DEVICE, precision):
            out = model(ids, mask, labels=labels)
        assert out["loss"].dtype == torch.float32           # the loss is computed in fp32
        assert out["logits"].dtype == torch.bfloat16        # the matmuls ran in bf16
        out["loss"].backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        assert all(p.dtype == torch.float32 for p in model.parameters())  # fp32 master weights
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(out["loss"].detach()))
    # 30% positives: the shared output bias alone takes the loss from ln 2 to ~0.61 (x0.88)
    assert losses[-1] < 0.95 * losses[0], losses


@pytest.mark.gpu
@needs_device
def test_label_attention_softmax_is_fp32_under_autocast_and_padding_gets_zero():
    head = LabelAttention(32, 6).to(DEVICE)
    gen = torch.Generator().manual_seed(2)
    # Quarter-integer states and label vectors: every score <h_i, l_j> is a multiple of 1/16 below 8,
    # exact in bf16, so the bf16 matmul under autocast gives exactly these scores and any error in the
    # weights comes from the softmax alone (a bf16 softmax is off by ~1e-3, an fp32 one by ~1e-7).
    hidden = (torch.randint(-2, 3, (2, 9, 32), generator=gen).float() / 4).to(DEVICE)
    with torch.no_grad():
        head.label_vectors.copy_((torch.randint(-2, 3, (6, 32), generator=gen).float() / 4).to(DEVICE))
    mask = torch.ones(2, 9, dtype=torch.long, device=DEVICE)
    mask[1, 5:] = 0
    with torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16):
        logits, attention = head(hidden, mask, return_attention=True)
    assert attention.dtype == torch.float32 and torch.isfinite(logits.float()).all()
    scores = torch.einsum("bth,mh->bmt", hidden.double(), head.label_vectors.double())  # (B, M, T) exact
    scores = scores.masked_fill(mask[:, None, :] == 0, float("-inf"))
    expected = scores.softmax(dim=-1)
    assert (attention[1, :, 5:] == 0).all()                 # padding: exactly zero weight
    assert (attention[1, :, :5] > 0).all()
    torch.testing.assert_close(attention.double(), expected, atol=2e-6, rtol=0)


@pytest.mark.gpu
@needs_device
def test_scorer_on_cuda_matches_the_cpu_fp32_engine(tmp_path):
    model_dir = make_model_dir(tmp_path)
    texts = [SENTENCES[0], LONG, SENTENCES[2] + " " + SENTENCES[3], ""]
    reference = make_predict_fn(model_dir, device="cpu", cpu_bf16=False)
    engine = make_predict_fn(model_dir, device=DEVICE, cpu_bf16=True)
    assert engine.device.type == torch.device(DEVICE).type
    assert next(engine.model.parameters()).device.type == torch.device(DEVICE).type
    if DEVICE == "cuda":
        assert engine.precision == decide_precision("cuda")  # bf16 autocast where the GPU supports it
        assert engine.autocast == torch.cuda.is_bf16_supported()
    else:
        assert engine.precision.bf16
    got, want = engine.score(texts), reference.score(texts)
    assert got.probs.shape == want.probs.shape == (4, 5) and got.probs.dtype == np.float32
    assert got.n_chunks.tolist() == want.n_chunks.tolist() and got.n_chunks[1] > 3
    assert np.abs(got.probs - want.probs).max() < 2e-2     # bf16 against fp32: close, not equal
    assert np.isfinite(got.probs).all()


def test_gpu_check_script_skips_cleanly_without_cuda():
    """On a machine without a GPU the check prints why it skipped and succeeds (cheap: one torch import)."""
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the script would run the full check")
    env = {k: v for k, v in os.environ.items() if k not in ("GPU_CHECK_DRY_RUN", "BERTXML_GPU_TESTS_ON")}
    env["PYTHON"] = sys.executable
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "no CUDA device: skipped" in done.stdout
    assert "==== tests" not in done.stdout                  # no stage started
