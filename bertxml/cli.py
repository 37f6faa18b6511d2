"""The `bertxml` command: one sub-command per job, each a thin wrapper over one library function.

    bertxml generate --notes 2000            # a synthetic EHR warehouse (ehr.notes, ehr.diagnoses)
    bertxml etl                              # bertxml.labeled_notes, label_vocab, rejects
    bertxml sql "SELECT ..." --format json   # Spark SQL over the warehouse
    bertxml sql-server --port 10000          # JDBC/ODBC (beeline, BI tools) over the warehouse
    bertxml demo                             # the main job end to end on the embedded default

Every command takes --workdir DIR (default ./warehouse), --conf FILE (YAML over the defaults, repeatable)
and --set section.key=value (repeatable). Exit status 0 on success, 1 on a job error, 2 on bad usage.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from bertxml.config import ConfigError, load_config

log = logging.getLogger("bertxml.cli")


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("py4j", "matplotlib", "urllib3", "filelock", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def open_warehouse(args, app: str):
    """Config + SparkSession + Warehouse for a command."""
    from bertxml.warehouse import Warehouse, get_spark

    cfg = load_config(args.conf, args.set, getattr(args, "size", None))
    spark = get_spark(cfg, app=f"bertxml-{app}")
    return Warehouse(spark, Path(args.workdir), cfg)


# ---- commands ----------------------------------------------------------------------------------------
def cmd_generate(args) -> int:
    from bertxml.generate import run_generate

    if args.notes is not None:
        args.set = [f"generate.notes={args.notes}"] + (args.set or [])
    if args.seed is not None:
        args.set = [f"generate.seed={args.seed}"] + (args.set or [])
    wh = open_warehouse(args, "generate")
    result = run_generate(wh, wh.cfg.generate)
    print(json.dumps(result, default=str))
    return 0


def cmd_etl(args) -> int:
    from bertxml.etl import run_etl

    if args.min_code_count is not None:
        args.set = (args.set or []) + [f"etl.min_code_count={args.min_code_count}"]
    wh = open_warehouse(args, "etl")
    result = run_etl(wh, wh.cfg, args.notes, args.diagnoses, args.as_of_version, args.as_of_timestamp)
    print(json.dumps(result, default=str))
    return 0


def cmd_sql(args) -> int:
    from bertxml.sql import format_rows

    wh = open_warehouse(args, "sql")
    try:
        df = wh.spark.sql(args.query)
        rows = df.collect()
    except Exception as exc:  # Spark's AnalysisException / ParseException: print its message, exit 1
        message = getattr(exc, "getMessage", lambda: str(exc))()
        print(f"error: {message}", file=sys.stderr)
        return 1
    print(format_rows(df.columns, rows, args.format), end="")
    return 0


def cmd_sql_server(args) -> int:
    from bertxml.sqlserver import serve

    wh = open_warehouse(args, "sql-server")
    serve(wh, port=args.port, host=args.host)
    return 0


def cmd_demo(args) -> int:
    from bertxml.demo import run_demo

    wh = open_warehouse(args, "demo")
    return run_demo(wh)


# ---- parser ------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--workdir", default="warehouse", help="warehouse root (default ./warehouse)")
    common.add_argument("--conf", action="append", default=[], metavar="FILE",
                        help="YAML config over the defaults (repeatable, later wins)")
    common.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value (repeatable)")
    common.add_argument("-v", "--verbose", action="store_true")

    inputs = argparse.ArgumentParser(add_help=False)
    inputs.add_argument("--notes", metavar="SOURCE", help="notes: a table name or parquet:/csv:/delta:PATH")
    inputs.add_argument("--diagnoses", metavar="SOURCE", help="diagnoses: a table name or parquet:/csv:/delta:PATH")
    inputs.add_argument("--as-of-version", type=int, help="read the input Delta tables as of this version")
    inputs.add_argument("--as-of-timestamp", help="read the input Delta tables as of this timestamp")

    parser = argparse.ArgumentParser(prog="bertxml", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", parents=[common], help="write a synthetic EHR warehouse")
    p.add_argument("--notes", type=int, help="number of notes (generate.notes)")
    p.add_argument("--seed", type=int, help="random seed (generate.seed)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("etl", parents=[common, inputs], help="filter, label, impute, split (paper §4.1)")
    p.add_argument("--min-code-count", type=int, help="label vocabulary threshold (etl.min_code_count)")
    p.set_defaults(func=cmd_etl)

    p = sub.add_parser("sql", parents=[common], help="run Spark SQL over the warehouse")
    p.add_argument("query")
    p.add_argument("--format", choices=["table", "csv", "json"], default="table")
    p.set_defaults(func=cmd_sql)

    p = sub.add_parser("sql-server", parents=[common], help="Thrift JDBC/ODBC server over the warehouse")
    p.add_argument("--port", type=int, default=10000)
    p.add_argument("--host", default="localhost")
    p.set_defaults(func=cmd_sql_server)

    p = sub.add_parser("demo", parents=[common], help="the main job end to end on the embedded default")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # a job error: logged with its cause, non-zero exit for the scheduler
        log.error("%s failed: %s: %s", args.command, type(exc).__name__, exc)
        if args.verbose:
            raise
        return 1


if __name__ == "__main__":
    sys.exit(main())
