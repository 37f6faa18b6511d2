"""What the MLflow registry adds: to `make install` (the packages it brings) and to the nightly job's start-up
(import + resolving `models:/bertxml@champion` against the embedded SQLite store).

    flock /tmp/bertxml-cpu.lock .venv/bin/python benchmarks/mlflow_overhead.py [--repeats 3] [--no-install]

1. install: the distributions that mlflow-skinny, sqlalchemy and alembic bring and nothing else in
   setup.py needs (from the installed metadata), their size on disk, and the time `pip install --no-deps
   --target TMP` takes for exactly those pins (wheels from pip's cache when there, else the index);
2. start-up, each in a fresh Python process (median of --repeats): resolving a model folder given as a
   path (no mlflow import: today's path), resolving the default (`champion` alias) of the embedded
   registry, and `import mlflow` alone; plus the one-off creation of a new store (first logged run).
Prints one line per figure.
"""
from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ADDED = ("mlflow-skinny", "sqlalchemy", "alembic")


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(names) -> set[str]:
    """The installed distributions `names` need on this platform, transitively (extras left out)."""
    from packaging.requirements import Requirement

    seen, todo = set(), [norm(n) for n in names]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        seen.add(name)
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue  # an extra, or another platform's requirement
            todo.append(norm(req.name))
    return seen


def setup_requirements() -> list[str]:
    text = (ROOT / "setup.py").read_text()
    return [norm(m) for m in re.findall(r'"([A-Za-z0-9_.\-]+)==', text)]


def added_distributions() -> list[tuple[str, str, int]]:
    others = closure([r for r in setup_requirements() if r not in {norm(a) for a in ADDED}])
    added = sorted(closure(ADDED) - others)
    out = []
    for name in added:
        dist = metadata.distribution(name)
        size = sum((f.size or 0) for f in dist.files or [])
        out.append((dist.metadata["Name"], dist.version, size))
    return out


def time_install(pins: list[str]) -> float:
    with tempfile.TemporaryDirectory() as target:
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", target, *pins],
                       check=True)
        return time.perf_counter() - started


TINY_MODEL = r"""
import sys
from pathlib import Path
import torch
from bertxml.config import ModelConfig, VocabConfig
from bertxml.models.bert import BertForIcdCoding, bert_config, save_model
from bertxml.models.modeldir import write_model_dir
from bertxml.text.vocab import train_tokenizer
out = Path(sys.argv[1]); out.mkdir(parents=True)
tok = train_tokenizer([["chest pain and cough", "blood pressure follow up"] * 20],
                      VocabConfig(size=200, min_frequency=1, min_patients=1))
tok.save(str(out / "tokenizer.json"))
codes = ["I10", "R05.9", "E11.9"]
mcfg = ModelConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                   max_position_embeddings=64, max_len=16)
save_model(BertForIcdCoding(bert_config(mcfg, tok.get_vocab_size()), len(codes), "bertxml"), out)
write_model_dir(out, model_version="bench-tiny", model_kind="bertxml", config={}, inputs={}, max_len=16,
                dev_metrics={}, parameters=0, train_seconds=0.0, tokenizer_file=out / "tokenizer.json",
                label_vocab=[{"label_index": i, "code": c, "train_count": 1} for i, c in enumerate(codes)],
                thresholds={c: 0.5 for c in codes})
"""

REGISTER = r"""
import sys, time
from bertxml.config import Config
from bertxml.models import registry
cfg, workdir, folder = Config(), sys.argv[1], sys.argv[2]
started = time.perf_counter()
logged = registry.log_model_run(cfg, workdir, folder, "benchmark")
registry.client(cfg, workdir).set_registered_model_alias("bertxml", "champion", logged.version)
print(f"{time.perf_counter() - started:.3f}")
"""

RESOLVE = r"""
import sys, time
started = time.perf_counter()
from bertxml.config import Config
from bertxml.models.registry import resolve_model
cfg = Config()
model = sys.argv[2] if len(sys.argv) > 2 else None
resolved = resolve_model(cfg, sys.argv[1], model)
assert (resolved.model_dir / "manifest.json").exists()
print(f"{time.perf_counter() - started:.3f}")
"""

IMPORT = r"""
import time
started = time.perf_counter()
import mlflow
print(f"{time.perf_counter() - started:.3f}")
"""


def child(code: str, *args) -> float:
    env_cmd = [sys.executable, "-c", code, *map(str, args)]
    out = subprocess.run(env_cmd, check=True, capture_output=True, text=True, cwd=ROOT,
                         env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    return float(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-install", action="store_true", help="skip the pip install timing")
    args = parser.parse_args()

    added = added_distributions()
    total = sum(size for _, _, size in added)
    print(f"install: {len(added)} distributions added by {', '.join(ADDED)}, {total / 2**20:.1f} MiB on disk:")
    print("  " + ", ".join(f"{n}=={v}" for n, v, _ in added))
    if not args.no_install:
        seconds = time_install([f"{n}=={v}" for n, v, _ in added])
        print(f"install: pip install --no-deps --target of those {len(added)} pins: {seconds:.1f} s")

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp) / "warehouse"
        folder = workdir / "models" / "bench-tiny"
        subprocess.run([sys.executable, "-c", TINY_MODEL, str(folder)], check=True, cwd=ROOT,
                       env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
        first = child(REGISTER, workdir, folder)
        print(f"first logged run (creates the SQLite store, logs, registers, sets the alias): {first:.2f} s")
        figures = {"path": [], "alias": [], "import": []}
        for _ in range(args.repeats):
            figures["path"].append(child(RESOLVE, workdir, folder))
            figures["alias"].append(child(RESOLVE, workdir))
            figures["import"].append(child(IMPORT))
        med = {k: statistics.median(v) for k, v in figures.items()}
        print(f"start-up: resolve --model FOLDER (no mlflow): {med['path']:.2f} s (median of {args.repeats})")
        print(f"start-up: resolve the default models:/bertxml@champion (import mlflow + SQLite lookup): "
              f"{med['alias']:.2f} s (median of {args.repeats})")
        print(f"start-up: import mlflow alone: {med['import']:.2f} s; the registry adds "
              f"{med['alias'] - med['path']:.2f} s to the nightly job's start-up")
    return 0


if __name__ == "__main__":
    sys.exit(main())
