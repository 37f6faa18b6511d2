"""The stages of benchmarks/gpu_check.sh that run Python: fine-tuning throughput, the Spark scoring path on
GPU-scheduled tasks, and one DDP step. Each prints its figures and, last, one `SUMMARY ...` line that the
shell script puts in its table.

    python benchmarks/gpu_check.py train [--device cuda] [--sizes small big] [--seq-len 1024] [--batch 32] [--steps 30]
    python benchmarks/gpu_check.py spark [--device auto] [--notes 4000] [--size small] [--max-len 512]
    python -m torch.distributed.run --standalone --nproc_per_node N benchmarks/gpu_check.py ddp [--device cuda]

`--device cpu` with small sizes is the dry run that checks this code on a machine without a GPU (the shell
script's GPU_CHECK_DRY_RUN=1); its figures mean nothing.

- train: bertxml's fine-tuning step (`benchmarks/train.py` `time_steps`: forward under the precision
  `bertxml.models.precision` picks, backward, clipping, AdamW) on random batches of seq-len tokens; tokens/s of the
  fastest step and of all steps, MFU against the matmul peak measured here in the same dtype, and
  torch.cuda.max_memory_allocated.
- spark: a night of notes from the synthetic generator (`bertxml.etl.generate`) scored by `bertxml.scoring.score.
  score_notes` on a Spark `local-cluster` whose worker owns the GPUs (discovery script
  benchmarks/gpu_discovery.sh) and whose tasks each ask for one (`spark.task.resource.gpu.amount=1`). Plain
  `local[N]` mode cannot do this: Spark refuses task GPU amounts there ("No executor resource configs were
  specified for the following task configs: gpu") and its local backend offers no GPU to a task. The
  engine called directly (`make_predict_fn`) on the same notes gives the ratio.
- ddp: one DistributedDataParallel step of a tiny model through bertxml.training.loop's own process-group and
  device helpers (nccl on CUDA, gloo on the CPU); checks that gradients and weights agree on every rank.
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))  # first: `train`, `score` and `machine` are the benchmarks beside this file

import torch  # noqa: E402

GIB = 2 ** 30


def summary(text: str) -> None:
    print(f"SUMMARY {text}", flush=True)


# ---- train -------------------------------------------------------------------------------------------------
def stage_train(args) -> int:
    from machine import describe_machine, matmul_peak
    from train import build, encoder_nonembedding, model_flops, time_steps

    from bertxml.config import ModelConfig
    from bertxml.config_io import model_preset
    from bertxml.models.precision import decide_precision

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    precision = decide_precision(device)
    print(describe_machine())
    if cuda:
        print(f"GPU {torch.cuda.get_device_name(device)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    peak = matmul_peak(precision.dtype, device)[0]
    dtype = str(precision.dtype).removeprefix("torch.")
    print(f"precision {precision}; measured {dtype} matmul peak {peak / 1e12:,.1f} TFLOP/s")
    header = (f"{'size':6} {'batch x len':>11} {'steps':>5} {'best step s':>11} {'tokens/s':>10} "
              f"{'tokens/s all':>12} {'MFU':>6} {'peak mem GiB':>12}")
    print(header + "\n" + "-" * len(header))
    parts = []
    for size in args.sizes:
        cfg = ModelConfig(**model_preset(size))
        cfg.max_len = args.seq_len
        torch.manual_seed(0)
        model = build(cfg, "finetune").to(device)
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        started = time.perf_counter()
        best, _ = time_steps(model, "finetune", device, precision, args.batch, args.seq_len, args.steps)
        total = time.perf_counter() - started  # the steps and their one warm-up step
        tokens = args.batch * args.seq_len
        flops = model_flops(cfg, encoder_nonembedding(model), "finetune", args.batch, args.seq_len)
        mfu = flops / best / peak
        memory = torch.cuda.max_memory_allocated(device) / GIB if cuda else float("nan")
        print(f"{size:6} {f'{args.batch} x {args.seq_len}':>11} {args.steps:5d} {best:11.4f} {tokens / best:10,.0f} "
              f"{tokens * (args.steps + 1) / total:12,.0f} {mfu:6.1%} {memory:12.1f}", flush=True)
        parts.append(f"{size} {tokens / best:,.0f} tok/s MFU {mfu:.0%} mem {memory:.1f} GiB")
        del model
        if cuda:
            torch.cuda.empty_cache()
    print("tokens/s: of the fastest step; 'all': every step including the warm-up. MFU: model FLOPs of the "
          f"fastest step / the measured {dtype} matmul peak.")
    summary(f"{dtype}, {args.batch}x{args.seq_len}: " + "; ".join(parts))
    return 0


# ---- spark -------------------------------------------------------------------------------------------------
def night_of_notes(n: int, seed: int = 7) -> list[str]:
    """n note texts from the synthetic warehouse generator (no defects), patient by patient."""
    from bertxml.config import GenerateConfig
    from bertxml.etl.patients import PatientGenerator

    gen = PatientGenerator(GenerateConfig(notes=n, seed=seed, bad_row_rate=0.0, drop_rate=0.0))
    texts, i = [], 0
    while len(texts) < n:
        texts += [row[7] for row in gen.note_rows(i) if row[7]]
        i += 1
    return texts[:n]


def gpu_session(n_gpus: int, cores: int, memory_mb: int):
    """A Spark local-cluster (one worker, one executor in its own JVM) that schedules GPUs: the worker
    discovers them with benchmarks/gpu_discovery.sh, the executor takes them all, each task asks for one
    and gets cores / n_gpus CPUs. No Delta: the scoring path needs none."""
    from pyspark.sql import SparkSession

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    os.environ.setdefault("GPU_CHECK_PYTHON", sys.executable)
    # an executable copy: a working tree copied without its mode bits still gives the worker a runnable script
    script = Path(tempfile.mkdtemp(prefix="bertxml-gpu-discovery-")) / "gpu_discovery.sh"
    shutil.copyfile(HERE / "gpu_discovery.sh", script)
    script.chmod(0o755)
    settings = {
        "spark.worker.resource.gpu.amount": str(n_gpus),
        "spark.worker.resource.gpu.discoveryScript": str(script),
        "spark.executor.resource.gpu.amount": str(n_gpus),
        "spark.task.resource.gpu.amount": "1",
        "spark.executor.cores": str(cores),
        "spark.task.cpus": str(max(1, cores // n_gpus)),
        "spark.executor.memory": f"{memory_mb // 2}m",
        "spark.executorEnv.PYTHONPATH": os.environ.get("PYTHONPATH", str(HERE.parent)),
        "spark.sql.shuffle.partitions": str(n_gpus),
        "spark.sql.execution.arrow.pyspark.enabled": "true",
        "spark.sql.session.timeZone": "UTC",
        "spark.ui.enabled": "false",
        "spark.ui.showConsoleProgress": "false",
    }
    builder = SparkSession.builder.master(f"local-cluster[1,{cores},{memory_mb}]").appName("bertxml-gpu-check")
    for key, value in settings.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    return spark


def task_devices(spark, n_tasks: int) -> list[tuple]:
    """(GPU addresses Spark gave the task, the device bertxml.models.devices.resolve_device picks there) per task."""
    import pandas as pd

    def probe(frames):
        from pyspark import TaskContext

        from bertxml.models.devices import resolve_device

        for _ in frames:
            gpu = TaskContext.get().resources().get("gpu")
            yield pd.DataFrame({"gpus": [",".join(gpu.addresses) if gpu else ""], "device": [resolve_device("auto")]})

    rows = spark.range(n_tasks, numPartitions=n_tasks).mapInPandas(probe, "gpus string, device string").collect()
    return [(r["gpus"], r["device"]) for r in rows]


def stage_spark(args) -> int:
    import numpy as np
    from score import build_model_dir

    from bertxml.config import ScoreConfig, VocabConfig
    from bertxml.config import score_options
    from bertxml.scoring.udf import arrow_batch_conf, score_notes
    from bertxml.scoring.predictors import make_predict_fn
    from bertxml.text.vocab import train_tokenizer

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    cuda = args.device in ("auto", "cuda") and torch.cuda.is_available()
    n_gpus = max(1, min(torch.cuda.device_count(), args.max_gpus)) if cuda else 1
    cores = args.cores or max(1, min(os.cpu_count() or 1, 8 * n_gpus))

    started = time.perf_counter()
    texts = night_of_notes(args.notes)
    tokenizer = train_tokenizer((texts[i:i + 500] for i in range(0, len(texts), 500)),
                                VocabConfig(size=args.vocab_size))
    tmp = Path(tempfile.mkdtemp(prefix="bertxml-gpu-check-"))
    model_dir = build_model_dir(tmp, tokenizer, args.size, args.labels, args.max_len)
    print(f"{len(texts)} synthetic notes, vocabulary {tokenizer.get_vocab_size()}, model {args.size} with "
          f"{args.labels} codes, max_len {args.max_len}: prepared in {time.perf_counter() - started:.1f}s", flush=True)

    started = time.perf_counter()
    spark = gpu_session(n_gpus, cores, args.memory_mb)
    try:
        print(f"Spark {spark.version} {spark.sparkContext.master}: {n_gpus} GPU(s), {cores} cores, "
              f"spark.task.resource.gpu.amount=1, spark.task.cpus={max(1, cores // n_gpus)}; started in "
              f"{time.perf_counter() - started:.1f}s", flush=True)
        seen = task_devices(spark, n_gpus)
        print(f"tasks saw: {seen} (GPU addresses from the scheduler, device from bertxml.models.devices.resolve_device)")
        if not all(gpus for gpus, _ in seen):
            raise RuntimeError(f"a task got no GPU from the scheduler: {seen}")

        cfg = ScoreConfig()
        cfg.device = "auto" if cuda else args.device   # auto: the task's GPU, as the nightly job runs
        cfg.partitions = n_gpus
        df = spark.createDataFrame([(f"n{i}", x) for i, x in enumerate(texts)], "note_id string, text string")
        df = df.cache()
        df.count()
        scored = score_notes(df, model_dir, cfg)

        def run_spark() -> float:
            begin = time.perf_counter()
            with arrow_batch_conf(spark, cfg.arrow_batch_notes):
                scored.write.format("noop").mode("overwrite").save()
            return time.perf_counter() - begin

        cold = run_spark()   # starts the Python workers, loads the model, starts CUDA in them
        warm = min(run_spark() for _ in range(args.reps))
        check = {r["note_id"]: np.asarray(r["probabilities"], dtype=np.float32) for r in
                 score_notes(df.limit(args.check_notes), model_dir, cfg).select("note_id", "probabilities").collect()}
    finally:
        spark.stop()

    device = "cuda" if cuda else args.device
    options = score_options(cfg)
    options["num_threads"] = max(1, cores // n_gpus)
    engine = make_predict_fn(model_dir, device=device, **options)
    engine(texts[:4])
    direct = float("inf")
    for _ in range(args.reps):
        begin = time.perf_counter()
        engine(texts)
        if cuda:
            torch.cuda.synchronize()
        direct = min(direct, time.perf_counter() - begin)
    ids = sorted(check, key=lambda k: int(k[1:]))
    mine = engine([texts[int(k[1:])] for k in ids])
    diff = float(np.abs(mine - np.stack([check[k] for k in ids])).max()) if ids else float("nan")

    n = len(texts)
    print(f"\n{'path':52s} {'seconds':>8s} {'notes/s':>9s} {'ratio':>6s}")
    print(f"{'engine called directly (' + device + ', ' + str(engine.precision.dtype).removeprefix('torch.') + ')':52s}"
          f" {direct:8.2f} {n / direct:9.1f} {1:6.2f}")
    print(f"{'Spark score_notes, warm workers':52s} {warm:8.2f} {n / warm:9.1f} {direct / warm:6.2f}")
    print(f"{'Spark score_notes, first run (workers start)':52s} {cold:8.2f} {n / cold:9.1f} {direct / cold:6.2f}")
    print(f"max |p_spark - p_direct| over {len(ids)} notes: {diff:.2e}")
    if not diff < 2e-2:
        raise RuntimeError(f"Spark and the direct engine disagree: max |dp| {diff:.2e} over {len(ids)} notes")
    summary(f"{n} notes: Spark {n / warm:,.0f} notes/s, direct {n / direct:,.0f}, ratio {direct / warm:.2f} "
            f"(first run {n / cold:,.0f}); tasks on {','.join(d for _, d in seen)}")
    return 0


# ---- ddp ---------------------------------------------------------------------------------------------------
def stage_ddp(args) -> int:
    import torch.distributed as dist

    from bertxml.config import ModelConfig
    from bertxml.models.bert import BertForIcdCoding, bert_config
    from bertxml.models.precision import autocast, decide_precision
    from bertxml.training.loop import init_distributed, make_optimizer, pick_device

    use_gpu = args.device != "cpu"
    rank, world, local_rank, created = init_distributed(use_gpu)
    device = pick_device(local_rank, use_gpu)
    if not dist.is_initialized():  # one process: init_distributed leaves it alone; DDP still needs a group
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        world, created = 1, True
    torch.manual_seed(0)
    mcfg = ModelConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                       max_position_embeddings=256, max_len=128, hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0)
    model = BertForIcdCoding(bert_config(mcfg, 1000), 50, "bertxml").to(device)
    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if device.type == "cuda" else None)
    optimizer = make_optimizer(model, 1e-3, 0.01)
    precision = decide_precision(device)
    gen = torch.Generator().manual_seed(100 + rank)  # each rank its own batch, as in training
    ids = torch.randint(5, 1000, (4, 128), generator=gen).to(device)
    labels = (torch.rand(4, 50, generator=gen) < 0.1).float().to(device)
    started = time.perf_counter()
    with autocast(device, precision):
        loss = ddp(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)["loss"]
    loss.backward()

    def spread(tensors) -> float:
        """Largest difference of these tensors between ranks."""
        flat = torch.cat([t.detach().float().flatten() for t in tensors])
        high, low = flat.clone(), flat.clone()
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
        return float((high - low).abs().max())

    grad_spread = spread([p.grad for p in model.parameters() if p.grad is not None])
    optimizer.step()
    weight_spread = spread(list(model.parameters()))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    losses = torch.tensor([float(loss.detach())], device=device)
    dist.all_reduce(losses)
    backend = dist.get_backend()
    if rank == 0:
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
        print(f"DDP step: backend {backend}, world size {world}, device {device} ({name}), precision {precision}; "
              f"mean loss {float(losses) / world:.4f}; step {seconds:.2f}s; gradients differ between ranks by "
              f"{grad_spread:.1e}, weights after the step by {weight_spread:.1e}", flush=True)
    ok = grad_spread == 0.0 and weight_spread == 0.0
    if created:
        dist.destroy_process_group()
    if not ok:
        raise RuntimeError(f"ranks disagree after all-reduce: gradients {grad_spread:.1e}, weights {weight_spread:.1e}")
    if rank == 0:
        summary(f"{backend}, {world} process(es) on {device.type}: gradients and weights equal on every rank")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="stage", required=True)
    p = sub.add_parser("train")
    p.add_argument("--device", default="cuda")
    p.add_argument("--sizes", nargs="+", default=["small", "big"])
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=30)
    p = sub.add_parser("spark")
    p.add_argument("--device", default="auto", help="auto: each task's GPU; cpu: the dry run")
    p.add_argument("--notes", type=int, default=4000)
    p.add_argument("--size", default="small")
    p.add_argument("--labels", type=int, default=2292)
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--vocab-size", type=int, default=20000)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--check-notes", type=int, default=32)
    p.add_argument("--cores", type=int, default=0, help="executor cores (0: up to 8 per GPU)")
    p.add_argument("--max-gpus", type=int, default=8)
    p.add_argument("--memory-mb", type=int, default=8192, help="the local-cluster worker's memory")
    p = sub.add_parser("ddp")
    p.add_argument("--device", default="cuda")
    args = parser.parse_args(argv)
    if getattr(args, "device", "cpu") == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"{args.stage}: --device cuda but torch {torch.__version__} sees no CUDA device")
    return {"train": stage_train, "spark": stage_spark, "ddp": stage_ddp}[args.stage](args)


if __name__ == "__main__":
    sys.exit(main())
