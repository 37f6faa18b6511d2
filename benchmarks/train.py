"""Training throughput: tokens/s and model FLOPs utilisation (MFU) of pre-training and fine-tuning steps.

    .venv/bin/python benchmarks/train.py [--sizes tiny small] [--seq-len 256] [--batch 8] [--steps 3]
                                         [--attention-dropout 0.1 0] [--padding 0.07]
                                         [--precision auto|fp32|bf16|both]

For each model size (conf/model/*.yaml) and task (pretrain: MLM+NSP; finetune: BERT-XML label attention)
it times full optimizer steps as bertxml.training.train runs them (forward under autocast, backward, clipping,
AdamW) on random token batches of one length, on the CPU (all its cores) and, when CUDA is present, on the
GPU. The precision is the one training uses on that device (`auto`: bertxml.models.precision); `--precision both`
adds the other one (slow: on a CPU without native bf16, bf16 steps take minutes).

It prints the CPU's model, torch's capability and whether it multiplies bf16 natively. MFU = model FLOPs
per second / the matmul peak measured here in the dtype of the row (the best this machine does, not a
datasheet figure). Model FLOPs per step, forward + backward = 3 x forward:
    6 * N * tokens                 N = encoder parameters without the embeddings (the matmuls per token)
  + 12 * layers * T * H * tokens   self-attention scores and weighted sums
  + pretrain: 6 * H * (H + V) * masked  (MLM transform and decoder, at the masked 15% of positions only)
  + finetune: 6 * B * M * (2 * T * H + H * H + H)  (label attention, eq. 2-4)
Tokens are padded tokens (every row has length T here). Step times and peaks are the best observed. On the
CPU a second set of columns divides by the CPU time the process got (per thread) instead of the wall clock:
on a machine shared with other jobs the wall clock measures the neighbours too. Timing lives here; tests
never assert on it.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bertxml.config import ModelConfig  # noqa: E402
from bertxml.config_io import model_preset
from bertxml.models.bert import BertForIcdCoding, bert_config, count_parameters  # noqa: E402
from bertxml.models.pretraining import BertForPretraining  # noqa: E402
from bertxml.models.precision import autocast, decide_precision  # noqa: E402
from bertxml.training.loop import make_optimizer  # noqa: E402
from machine import DTYPES, describe_machine, matmul_peak, precisions_to_time, sync  # noqa: E402

VOCAB = 20000      # paper §4.2.1: 20K WordPieces
N_LABELS = 300     # about the label vocabulary of the synthetic warehouse
MASKED_SHARE = 0.15  # BERT's masked-LM share of positions (pretrain.mlm_probability)


def model_flops(cfg: ModelConfig, n_nonembedding: int, task: str, batch: int, seq_len: int) -> float:
    """Forward + backward FLOPs of one step (see the module docstring)."""
    tokens, h, layers = batch * seq_len, cfg.hidden_size, cfg.num_hidden_layers
    flops = 6 * n_nonembedding * tokens + 12 * layers * seq_len * h * tokens
    if task == "pretrain":
        flops += 6 * h * (h + VOCAB) * tokens * MASKED_SHARE
    else:
        flops += 6 * batch * N_LABELS * (2 * seq_len * h + h * h + h)
    return float(flops)


def build(cfg: ModelConfig, task: str) -> torch.nn.Module:
    config = bert_config(cfg, VOCAB, pad_token_id=0)
    return BertForPretraining(config) if task == "pretrain" else BertForIcdCoding(config, N_LABELS, "bertxml")


def encoder_nonembedding(model: torch.nn.Module) -> int:
    """Encoder parameters without the embedding tables (heads are counted by their own FLOP terms)."""
    encoder = model.bert
    return count_parameters(encoder) - count_parameters(encoder.embeddings)


def time_steps(model, task: str, device, precision, batch: int, seq_len: int, steps: int,
               padding: float = 0.0) -> tuple[float, float]:
    """Seconds per optimizer step: the fastest of `steps` after one warm-up step (on a shared machine the
    fastest step is the one least disturbed by other work, like the matmul peak it is compared with).
    padding > 0: row lengths spread evenly from (1 - 2 * padding) * seq_len to seq_len, so that share of the
    batch is padding and the attention gets a mask, as in real length-bucketed batches."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, VOCAB, (batch, seq_len), generator=g).to(device)
    lengths = torch.linspace(seq_len * (1 - 2 * padding), seq_len, batch).round().long()
    mask = (torch.arange(seq_len)[None, :] < lengths[:, None]).long().to(device)  # (B, T)
    if task == "pretrain":
        labels = torch.where(torch.rand(batch, seq_len, generator=g).to(device) < MASKED_SHARE, ids, torch.full_like(ids, -100))
        inputs = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids),
                  "mlm_labels": labels, "nsp_labels": torch.randint(2, (batch,), generator=g).to(device)}
    else:
        inputs = {"input_ids": ids, "attention_mask": mask,
                  "labels": (torch.rand(batch, N_LABELS, generator=g) < 0.02).float().to(device)}
    optimizer = make_optimizer(model, 1e-4, 0.01)
    model.train()
    times = []
    for _ in range(steps + 1):
        sync(device)
        wall, cpu = time.perf_counter(), time.process_time()
        with autocast(device, precision):
            loss = model(**inputs)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        wall = time.perf_counter() - wall
        # CPU time per thread: on a machine shared with other jobs, what these threads actually got
        times.append((wall, (time.process_time() - cpu) / torch.get_num_threads() if device.type == "cpu" else wall))
    return min(t[0] for t in times[1:]), min(t[1] for t in times[1:])


def run(device: torch.device, sizes: list[str], batch: int, seq_len: int, steps: int,
        attention_dropouts: list[float | None] = (None,), precision_choice: str = "auto",
        padding: float = 0.0) -> list[dict]:
    """Time every (size, task, precision) on device and print the table; returns its rows."""
    precisions = precisions_to_time(device, precision_choice)
    peaks = {p: matmul_peak(DTYPES[p], device) for p in precisions}
    cpu = device.type == "cpu"
    print(f"\n{device.type.upper()}  ({torch.get_num_threads()} threads)" if cpu
          else f"\nGPU  {torch.cuda.get_device_name(device)}")
    rows = []
    for size, dropout in ((size, dropout) for size in sizes for dropout in attention_dropouts):
        cfg = ModelConfig(**model_preset(size))
        cfg.max_len = seq_len
        if dropout is not None:
            cfg.attention_probs_dropout_prob = dropout
        for task in ("pretrain", "finetune"):
            for precision in precisions:
                torch.manual_seed(0)
                model = build(cfg, task).to(device)
                wall, cpu_s = time_steps(model, task, device, decide_precision(device, precision == "bf16"),
                                         batch, seq_len, steps, padding)
                flops = model_flops(cfg, encoder_nonembedding(model), task, batch, seq_len)
                rows.append({"size": size, "task": task, "precision": precision, "seconds": wall, "cpu_seconds": cpu_s,
                             "tokens_per_s": batch * seq_len / wall, "flops": flops,
                             "dropout": cfg.attention_probs_dropout_prob})
                del model
    # measured again at the end: the best of the two is this machine's peak (MFU never flatters)
    again = {p: matmul_peak(DTYPES[p], device) for p in precisions}
    peaks = {k: (max(peaks[k][0], again[k][0]), max(peaks[k][1], again[k][1])) for k in peaks}
    print("matmul peak, wall clock: " + ", ".join(f"{p} {peaks[p][0] / 1e9:,.0f} GFLOP/s" for p in precisions)
          + ("; by CPU time per thread: " + ", ".join(f"{p} {peaks[p][1] / 1e9:,.0f}" for p in precisions)
             if cpu else ""))
    header = (f"{'size':6} {'task':9} {'precision':9} {'attn drop':>9} {'batch x len':>11} {'step s':>7} "
              f"{'tokens/s':>9} {'GFLOP/s':>8} {'MFU':>6}" + (f" {'cpu s':>7} {'tokens/cpu-s':>12} {'MFU(cpu)':>8}" if cpu else ""))
    print(header)
    print("-" * len(header))
    for row in rows:
        row["mfu"] = row["flops"] / row["seconds"] / peaks[row["precision"]][0]
        line = (f"{row['size']:6} {row['task']:9} {row['precision']:9} {row['dropout']:9.2f} "
                f"{f'{batch} x {seq_len}':>11} {row['seconds']:7.3f} {row['tokens_per_s']:9,.0f} {row['flops'] / row['seconds'] / 1e9:8,.1f} "
                f"{row['mfu']:6.1%}")
        if cpu:
            row["mfu_cpu"] = row["flops"] / row["cpu_seconds"] / peaks[row["precision"]][1]
            line += f" {row['cpu_seconds']:7.3f} {batch * seq_len / row['cpu_seconds']:12,.0f} {row['mfu_cpu']:8.1%}"
        print(line, flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "small"])
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per configuration (after a warm-up)")
    parser.add_argument("--attention-dropout", type=float, nargs="+", default=[None],
                        help="override the presets' 0.1 (several: one row each, e.g. 0.1 0): with 0, PyTorch's SDPA "
                             "takes its fused kernel (attention dropout sends it to the unfused math path)")
    parser.add_argument("--padding", type=float, default=0.0,
                        help="share of each batch that is padding (0: none, no attention mask); length-bucketed "
                             "pre-training batches of the real corpora hold 5-9%% (benchmarks/padding.py)")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16", "both"], default="auto",
                        help="auto: what training uses on each device (bertxml.models.precision)")
    parser.add_argument("--gpu-batch", type=int, default=32)
    parser.add_argument("--gpu-seq-len", type=int, default=512)
    args = parser.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    print(f"bertxml training benchmark: vocabulary {VOCAB}, {N_LABELS} labels, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(describe_machine())
    print(f"padding {args.padding:.0%} of each batch" + (" (an attention mask)" if args.padding else ""))
    run(torch.device("cpu"), args.sizes, args.batch, args.seq_len, args.steps, args.attention_dropout, args.precision,
        args.padding)
    if torch.cuda.is_available():
        run(torch.device("cuda"), args.sizes + ["big"] if "big" not in args.sizes else args.sizes,
            args.gpu_batch, args.gpu_seq_len, max(args.steps, 5), args.attention_dropout, args.precision, args.padding)
    return 0


if __name__ == "__main__":
    sys.exit(main())
