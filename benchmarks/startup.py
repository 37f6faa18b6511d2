"""What importing each entry point of bertxml costs and loads: `bertxml --help`, the Spark jobs' modules
(ETL, scoring, drift, evaluate), the pandas-UDF worker side, and the training modules for comparison.

    flock /tmp/bertxml-cpu.lock .venv/bin/python benchmarks/startup.py [--repeats 5] [--root DIR]

Each figure is a fresh Python process (median of --repeats): the wall time of the import (for `--help`, of
the whole command), and which heavy packages it left in sys.modules. A Spark-only job should list no
torch, transformers or mlflow; `--help` none of those nor pyspark. --root measures another checkout
(e.g. the main branch, to compare before and after a change). Prints one line per entry point.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("pyspark", "pandas", "torch", "transformers", "mlflow", "sklearn", "scipy.stats", "matplotlib",
         "simple_icd_10_cm", "deltalake")
ENTRIES = ("bertxml.cli --help", "bertxml.etl.etl", "bertxml.etl.generate", "bertxml.text.vocab",
           "bertxml.text.tokenize", "bertxml.scoring.udf", "bertxml.scoring.score", "bertxml.scoring.drift",
           "bertxml.reports.evaluate", "bertxml.models.registry", "bertxml.training.train")
PROBE = """
import sys, time, runpy, io, contextlib
entry = sys.argv[1]
start = time.perf_counter()
if entry.endswith(" --help"):
    sys.argv = ["bertxml", "--help"]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
        runpy.run_module(entry.split()[0], run_name="__main__")
else:
    __import__(entry)
took = time.perf_counter() - start
print(f"{took:.3f}", " ".join(m for m in sys.argv[2:] if m in sys.modules))
"""


def measure(entry: str, root: Path, repeats: int) -> tuple[float, str]:
    env = {**os.environ, "PYTHONPATH": str(root)}
    times, loaded = [], ""
    for _ in range(repeats):
        out = subprocess.run([sys.executable, "-c", PROBE, entry, *HEAVY], env=env, cwd=root, check=True,
                             capture_output=True, text=True).stdout.split(maxsplit=1)
        times.append(float(out[0]))
        loaded = out[1].strip() if len(out) > 1 else ""
    return statistics.median(times), loaded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--root", type=Path, default=ROOT, help="the checkout to measure (default: this one)")
    args = parser.parse_args()
    print(f"{'entry point':28s} {'import s':>8s}  heavy packages loaded   (median of {args.repeats}, {args.root})")
    for entry in ENTRIES:
        took, loaded = measure(entry, args.root.resolve(), args.repeats)
        print(f"{entry:28s} {took:8.2f}  {loaded or '-'}")


if __name__ == "__main__":
    main()
