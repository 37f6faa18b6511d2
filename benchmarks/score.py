"""Scoring throughput: the engine against a textbook baseline, the Spark UDF against the engine, and model
FLOPs utilisation (figures, not a test).

    .venv/bin/python benchmarks/score.py [--notes 300] [--size tiny] [--labels 2292] [--max-len 512]
                                         [--reps 2] [--no-spark] [--precision auto|fp32|bf16|both]

On a realistic note-length mix (a seeded sample of MTSamples reports and CodiEsp clinical cases, read from
../shared/data with pyarrow; never copied), with a random-init BertForIcdCoding of the given size
(conf/model/<size>.yaml) and the paper's 2,292 codes, and a WordPiece vocabulary trained on the corpus on
the fly:

1. notes/s of the scoring engine (`make_predict_fn`: length-bucketed, no padding to max_len, SDPA, the
   label attention as one fused SDPA call, inference_mode) against a textbook baseline on the same weights
   (every chunk padded to max_len, fp32, eager attention, the model's own head, batches in note order,
   no_grad). Target: >= 4x. Engine paths: fp32, and bf16 weights with the label attention in blocks of
   codes (the default where the CPU has native bf16).
2. the Spark path (`score.score_notes`: mapInPandas, model loaded once per worker, one thread per task)
   against the engine called directly with the same number of threads in all. Target: >= 0.85.
3. model FLOPs utilisation: the model FLOPs of the real (unpadded) tokens per second, against a measured
   matmul peak of this machine in the row's dtype.
4. the cost of the evidence (`bertxml.evidence`: each predicted code's most attended spans, computed in the
   scoring pass): the same engine with evidence_top_k spans per predicted code, interleaved with the engine
   without, on the same notes. So that each note predicts about --codes-per-note codes (a random model puts
   every probability near 0.5), each code's threshold is set at its (1 - codes_per_note / labels) quantile
   over the notes. --evidence-top-k 0 leaves these rows out.

The machine is shared, so timings are taken in a way that tolerates load from elsewhere: the notes are
timed in segments of --segment notes, each scorer --reps times per segment, interleaved, and a scorer's
time is the sum over segments of its best repeat; the matmul peak is sampled on every round and the best
kept. The load average is printed with the results.

It prints the CPU's model, torch's capability and whether it multiplies bf16 natively. The engine runs
in the precision the nightly job picks on this CPU (`score.cpu_bf16=auto`, bertxml.models.precision); MFU is
measured against the matmul peak in that dtype. `--precision both` adds the other engine path (slow where
the CPU emulates bf16). Figures and their history: benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from machine import DTYPES, describe_machine, matmul_peak, precisions_to_time

from bertxml.config import ModelConfig, VocabConfig
from bertxml.config_io import model_preset
from bertxml.models.bert import BertForIcdCoding, bert_config, save_model
from bertxml.models.modeldir import write_model_dir
from bertxml.scoring.predictors import make_predict_fn
from bertxml.text.tokenize import encode_chunks
from bertxml.text.vocab import train_tokenizer

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
SOURCES = {"mtsamples": Path("mtsamples") / "corpus.parquet", "codiesp": Path("codiesp") / "notes.parquet"}


def load_texts(n: int, seed: int, data: Path = DATA) -> tuple[list[str], list[str]]:
    """(sample of n note texts from both corpora under `data`, every text for the vocabulary)."""
    texts = []
    for path in (data / p for p in SOURCES.values()):
        texts += [x for x in pq.read_table(path, columns=["text"]).column("text").to_pylist() if x]
    rng = np.random.default_rng(seed)
    return [texts[i] for i in rng.choice(len(texts), size=min(n, len(texts)), replace=False)], texts


def build_model_dir(root: Path, tokenizer, size: str, n_labels: int, max_len: int) -> Path:
    fields = {k: v for k, v in model_preset(size).items() if k in ModelConfig.__dataclass_fields__}
    mcfg = ModelConfig(**{**fields, "max_len": max_len})
    torch.manual_seed(0)
    model = BertForIcdCoding(bert_config(mcfg, tokenizer.get_vocab_size()), n_labels, "bertxml")
    out = root / f"bench-{size}"
    save_model(model, out)
    tokenizer.save(str(out / "tokenizer.json"))
    labels = [{"label_index": i, "code": f"C{i:04d}", "description": None, "train_count": 0, "is_chronic": False}
              for i in range(n_labels)]
    write_model_dir(out, model_version=f"bench-{size}", model_kind="bertxml", config={}, inputs={}, max_len=max_len,
                    dev_metrics={}, parameters=0, train_seconds=0.0, tokenizer_file=out / "tokenizer.json",
                    label_vocab=labels, thresholds={})
    return out


class TextbookScorer:
    """The baseline: same weights, eager attention, every chunk padded to max_len, batches of batch_size
    chunks in note order, the model's own forward, fp32, torch.no_grad."""

    def __init__(self, model_dir: Path, tokenizer, max_len: int, batch_size: int = 16):
        import json

        import safetensors.torch
        from transformers import BertConfig

        meta = json.loads((model_dir / "model_config.json").read_text())
        config = BertConfig.from_dict(meta["bert_config"], attn_implementation="eager")
        self.model = BertForIcdCoding(config, meta["n_labels"], meta["head"])
        safetensors.torch.load_model(self.model, model_dir / "model.safetensors", strict=True)
        self.model.eval()
        self.tokenizer, self.max_len, self.batch_size = tokenizer, max_len, batch_size

    def __call__(self, texts: list[str]) -> np.ndarray:
        notes = encode_chunks(self.tokenizer, texts, self.max_len)
        flat = [c for chunks in notes for c in chunks]
        owner = np.repeat(np.arange(len(notes)), [len(c) for c in notes])
        out = np.full((len(notes), self.model.n_labels), -np.inf, dtype=np.float32)
        with torch.no_grad():
            for start in range(0, len(flat), self.batch_size):
                rows = flat[start:start + self.batch_size]
                ids = torch.zeros((len(rows), self.max_len), dtype=torch.long)
                mask = torch.zeros_like(ids)
                for i, r in enumerate(rows):
                    ids[i, :len(r)] = torch.tensor(r)
                    mask[i, :len(r)] = 1
                logits = self.model(ids, mask)["logits"].numpy()
                for i, note in enumerate(owner[start:start + len(rows)]):
                    out[note] = np.maximum(out[note], logits[i])
        return 1 / (1 + np.exp(-out))


def model_flops(lengths: np.ndarray, cfg, n_labels: int) -> float:
    """Forward FLOPs of chunks of these real token counts (see `flops_from_sums`)."""
    t = lengths.astype(np.float64)
    return flops_from_sums(float(t.sum()), float((t * t).sum()), len(t), cfg, n_labels)


def flops_from_sums(tokens: float, tokens_sq: float, chunks: int, cfg, n_labels: int) -> float:
    """Forward FLOPs (2 per multiply-add) from the chunks' token count, the sum of their squared lengths and
    their number: per layer the Q, K, V, O projections and the FFN (2 T (4 H^2 + 2 H I)) and the attention
    (4 t^2 H per chunk); the label attention 4 M T H + 2 M H^2 per chunk."""
    h, i, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    encoder = layers * (2 * tokens * (4 * h * h + 2 * h * i) + 4 * tokens_sq * h)
    head = 4 * n_labels * tokens * h + 2 * n_labels * h * h * chunks
    return encoder + head


def segmented_best(fns: dict, texts: list[str], segment: int, reps: int, peaks: dict) -> dict:
    """Per scorer: the sum over segments of notes of its best time on the segment (scorers interleaved
    within each repeat); also samples the matmul peaks on every round, keeping the best."""
    total = {k: 0.0 for k in fns}
    for start in range(0, len(texts), segment):
        part = texts[start:start + segment]
        best = {k: float("inf") for k in fns}
        for _ in range(reps):
            for name, fn in fns.items():
                best[name] = min(best[name], _timed(lambda: fn(part)))
            for dtype in peaks:
                peaks[dtype] = max(peaks[dtype], matmul_peak(dtype, seconds=0.0)[0])
        for name in fns:
            total[name] += best[name]
    return total


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def best_of(fns: dict, reps: int) -> dict:
    """Interleaved best-of-reps wall time of each fn."""
    best = {k: float("inf") for k in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            best[name] = min(best[name], _timed(fn))
    return best


def spark_vs_direct(model_dir: Path, texts: list[str], threads: int, reps: int) -> dict:
    """notes/s of score_notes (one task, one thread, per core) and of the engine called directly with the
    same total threads; warm workers (the first action starts them and loads the model)."""
    from bertxml.config import Config
    from bertxml.scoring.udf import arrow_batch_conf, score_notes
    from bertxml.platform.warehouse import get_spark

    cfg = Config()
    cfg.spark.master = f"local[{threads}]"
    cfg.spark.shuffle_partitions = threads
    cfg.score.partitions = threads
    spark = get_spark(cfg, app="bertxml-bench-score")
    df = spark.createDataFrame([(f"n{i}", x) for i, x in enumerate(texts)], "note_id string, text string").cache()
    df.count()
    scored = score_notes(df, model_dir, cfg.score)

    def run_spark():
        with arrow_batch_conf(spark, cfg.score.arrow_batch_notes):
            scored.write.format("noop").mode("overwrite").save()

    cold = _timed(run_spark)
    torch.set_num_threads(threads)
    engine = make_predict_fn(model_dir, device="cpu",  # the UDF's evidence setting, for a like-for-like ratio
                             evidence_top_k=cfg.score.evidence_top_k if cfg.score.evidence else 0)
    engine(texts[:4])
    times = best_of({"spark": run_spark, "direct": lambda: engine(texts)}, reps)
    spark.stop()
    return {"cold_s": cold, **times}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--notes", type=int, default=512)
    parser.add_argument("--size", default="tiny", help="conf/model/<size>.yaml (tiny, small, big)")
    parser.add_argument("--labels", type=int, default=2292, help="codes (paper: 2,292)")
    parser.add_argument("--max-len", type=int, default=512)
    parser.add_argument("--vocab-size", type=int, default=20000)
    parser.add_argument("--reps", type=int, default=3, help="repeats per segment (best kept)")
    parser.add_argument("--segment", type=int, default=256,
                        help="notes per timed segment: the UDF's Arrow batch (score.arrow_batch_notes)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--no-spark", action="store_true")
    parser.add_argument("--data", type=Path, default=DATA, help="the folder holding mtsamples/ and codiesp/")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16", "both"], default="auto",
                        help="engine paths to time; auto: the one the nightly job uses on this CPU")
    parser.add_argument("--evidence-top-k", type=int, default=3,
                        help="spans per predicted code for the evidence rows (score.evidence_top_k); 0: none")
    parser.add_argument("--codes-per-note", type=float, default=8.0,
                        help="predicted codes per note in the evidence rows (per-code threshold quantiles)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    torch.set_num_threads(args.threads)

    print(describe_machine())
    texts, corpus = load_texts(args.notes, args.seed, args.data)
    started = time.perf_counter()
    tokenizer = train_tokenizer((corpus[i:i + 500] for i in range(0, len(corpus), 500)),
                                VocabConfig(size=args.vocab_size))
    vocab_s = time.perf_counter() - started
    tmp = Path(tempfile.mkdtemp(prefix="bertxml-bench-score-"))
    model_dir = build_model_dir(tmp, tokenizer, args.size, args.labels, args.max_len)
    chunks = [c for note in encode_chunks(tokenizer, texts, args.max_len) for c in note]
    lengths = np.array([len(c) for c in chunks])
    words = np.array([len(x.split()) for x in texts])
    print(f"{len(texts)} notes (MTSamples + CodiEsp), words/note median {np.median(words):.0f} p90 "
          f"{np.percentile(words, 90):.0f}; {len(chunks)} chunks of <= {args.max_len} tokens, real tokens "
          f"{lengths.sum() / (len(chunks) * args.max_len):.0%} of padded; vocabulary {tokenizer.get_vocab_size()} "
          f"trained in {vocab_s:.1f}s; model {args.size}, {args.labels} codes; {torch.get_num_threads()} threads")

    precisions = precisions_to_time("cpu", args.precision)
    default = precisions_to_time("cpu", "auto")[0]
    engines = {p: make_predict_fn(model_dir, device="cpu", cpu_bf16=p == "bf16") for p in precisions}
    baseline = TextbookScorer(model_dir, tokenizer, args.max_len)
    warm = texts[:4]
    for fn in (*engines.values(), baseline):
        fn(warm)
    p_base = baseline(texts)
    diffs = {p: float(np.abs(engine(texts) - p_base).max()) for p, engine in engines.items()}
    evidence_note = ""
    if args.evidence_top_k > 0:
        import json

        cut = np.quantile(p_base, 1 - args.codes_per_note / args.labels, axis=0)  # (M,) per-code thresholds
        (model_dir / "thresholds.json").write_text(json.dumps({f"C{i:04d}": float(x) for i, x in enumerate(cut)}))
        for p in precisions:
            engine = make_predict_fn(model_dir, device="cpu", cpu_bf16=p == "bf16",
                                     evidence_top_k=args.evidence_top_k)
            scored = engine.score(texts)
            diffs[p + "+evidence"] = float(np.abs(scored.probs - p_base).max())
            engines[p + "+evidence"] = engine
        predicted = (scored.probs >= engine.info.thresholds[None, :]).sum(axis=1)
        spans = np.array([len(x) for x in scored.evidence])
        evidence_note = (f"; evidence rows: {predicted.mean():.1f} predicted codes a note (median "
                         f"{np.median(predicted):.0f}, max {predicted.max()}), {spans.mean():.1f} spans a note")
    peaks = {torch.float32: matmul_peak(torch.float32)[0]}
    peaks.update({DTYPES[p]: matmul_peak(DTYPES[p])[0] for p in precisions})
    load_before = os.getloadavg()[0]
    times = segmented_best({"baseline": baseline, **engines}, texts, args.segment, args.reps, peaks)

    flops = model_flops(lengths, next(iter(engines.values())).model.config, args.labels)
    n = len(texts)
    labels = {"fp32": "engine, fp32 (bucketed, SDPA, fused head)", "bf16": "engine, bf16 weights, label blocks"}
    rows = [("textbook baseline (pad to max_len, eager, fp32)", times["baseline"], peaks[torch.float32], 0.0)]
    rows += [(labels[p] + (" *" if p == default else ""), times[p], peaks[DTYPES[p]], diffs[p]) for p in precisions]
    rows += [(f"  the same + evidence (top {args.evidence_top_k} spans a code)", times[p + "+evidence"],
              peaks[DTYPES[p]], diffs[p + "+evidence"]) for p in precisions if p + "+evidence" in times]
    print(f"\nload average {load_before:.1f} -> {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; best matmul "
          "peak: " + ", ".join(f"{p} {peaks[DTYPES[p]] / 1e9:.0f} GFLOP/s" for p in sorted(set(precisions) | {"fp32"}))
          + f"; model FLOPs of the real tokens {flops / 1e9:.0f} GFLOP")
    print(f"{'scorer':50s} {'seconds':>8s} {'notes/s':>8s} {'speed-up':>8s} {'MFU':>6s} {'max|dp|':>9s}")
    for name, sec, peak, diff in rows:
        print(f"{name:50s} {sec:8.2f} {n / sec:8.1f} {times['baseline'] / sec:7.2f}x {flops / sec / peak:6.1%} "
              f"{diff:9.2e}")
    print("* the default on this CPU (score.cpu_bf16=auto: bf16 where the CPU multiplies it natively)")
    for p in precisions:
        if p + "+evidence" in times:
            print(f"evidence overhead ({p}): {times[p + '+evidence'] / times[p] - 1:+.1%} scoring time"
                  + evidence_note)

    if not args.no_spark:
        res = spark_vs_direct(model_dir, texts, args.threads, max(args.reps, 4))
        print(f"\nSpark path ({args.threads} tasks x 1 thread, Arrow batches of 256 notes) vs the engine called "
              f"directly ({args.threads} threads):")
        print(f"{'path':50s} {'seconds':>8s} {'notes/s':>8s} {'ratio':>8s}")
        print(f"{'engine, direct':50s} {res['direct']:8.2f} {n / res['direct']:8.1f} {1:7.2f}x")
        print(f"{'Spark mapInPandas, warm workers':50s} {res['spark']:8.2f} {n / res['spark']:8.1f} "
              f"{res['direct'] / res['spark']:7.2f}x")
        print(f"{'Spark mapInPandas, first run (workers start)':50s} {res['cold_s']:8.2f} {n / res['cold_s']:8.1f} "
              f"{res['direct'] / res['cold_s']:7.2f}x")


if __name__ == "__main__":
    main()
