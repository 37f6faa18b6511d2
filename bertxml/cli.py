"""The `bertxml` command: one sub-command per job, each a thin wrapper over one library function.

    bertxml generate --notes 2000            # a synthetic EHR warehouse (ehr.notes, ehr.diagnoses)
    bertxml etl                              # bertxml.labeled_notes, label_vocab, rejects
    bertxml sql "SELECT ..." --format json   # Spark SQL over the warehouse
    bertxml sql-server --port 10000          # JDBC/ODBC (beeline, BI tools) over the warehouse, no note text
    bertxml demo                             # the main job end to end on the embedded default
    bertxml compare                          # the paper's Tables 2-3 on this warehouse (bertxml.model_comparison)
    bertxml promote 3 --alias champion       # point a registry alias at a registered model version
    bertxml score --model models:/bertxml@challenger   # score with a registered model (beside the champion)

Every command takes --workdir DIR (default ./warehouse), --conf FILE|NAME (YAML over the defaults,
repeatable; a bare NAME such as `prod` is a config shipped in bertxml/conf/) and --set section.key=value
(repeatable). Exit status 0 on success, 1 on a job error, 2 on bad usage.

Each command imports its job's modules when it runs, not at the top of this file: `bertxml --help` loads
none of pyspark, torch, transformers or MLflow, and a command loads only what its job needs (`sql` no torch).
"""
from __future__ import annotations

import argparse
import getpass
import json
import logging
import sys
from pathlib import Path

from bertxml.config import CONF_DIR, ConfigError
from bertxml.config_io import load_config

log = logging.getLogger("bertxml.cli")


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("py4j", "matplotlib", "urllib3", "filelock", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def open_warehouse(args, app: str, class_path: tuple[str, ...] = ()):
    """Config + SparkSession + Warehouse for a command."""
    # pyspark loads only for a command that opens the warehouse (module note above)
    from bertxml.platform.warehouse import Warehouse, get_spark

    cfg = load_config(args.conf, args.set, getattr(args, "size", None))
    spark = get_spark(cfg, app=f"bertxml-{app}", class_path=class_path)
    return Warehouse(spark, Path(args.workdir), cfg)


# ---- commands ----------------------------------------------------------------------------------------
def cmd_generate(args) -> int:
    # the job's modules load when it runs (module note above)
    from bertxml.etl.generate import run_generate

    if args.notes is not None:
        args.set = [f"generate.notes={args.notes}"] + (args.set or [])
    if args.seed is not None:
        args.set = [f"generate.seed={args.seed}"] + (args.set or [])
    wh = open_warehouse(args, "generate")
    result = run_generate(wh, wh.cfg.generate)
    print(json.dumps(result, default=str))
    return 0


def cmd_etl(args) -> int:
    # the job's modules load when it runs (module note above)
    from bertxml.etl.etl import run_etl

    if args.min_code_count is not None:
        args.set = (args.set or []) + [f"etl.min_code_count={args.min_code_count}"]
    wh = open_warehouse(args, "etl")
    result = run_etl(wh, wh.cfg, args.notes, args.diagnoses, args.as_of_run, args.as_of_timestamp)
    print(json.dumps(result, default=str))
    return 0


def cmd_sql(args) -> int:
    # the job's modules load when it runs (module note above)
    from bertxml.platform.sql import format_rows

    wh = open_warehouse(args, "sql")
    try:
        df = wh.spark.sql(args.query)
        rows = df.collect()
    except Exception as exc:  # Spark's AnalysisException / ParseException: print its message, exit 1
        message = exc.getMessage() if hasattr(exc, "getMessage") else str(exc)
        print(f"error: {message}", file=sys.stderr)
        return 1
    print(format_rows(df.columns, rows, args.format), end="")
    return 0


def _vocab_dir(args, wh) -> Path:
    return Path(args.vocab) if getattr(args, "vocab", None) else wh.workdir / "vocab"


def cmd_vocab(args) -> int:
    # the job's modules load when it runs (module note above)
    from bertxml.text.vocab import run_vocab

    wh = open_warehouse(args, "vocab")
    out = Path(args.out) if args.out else wh.workdir / "vocab"
    result = run_vocab(wh, wh.cfg, args.corpus or wh.cfg.vocab.corpus, out)
    print(json.dumps(result, default=str))
    return 0


def cmd_tokenize(args) -> int:
    # the job's modules load when it runs (module note above)
    from bertxml.text.tokenize import run_tokenize

    wh = open_warehouse(args, "tokenize")
    result = run_tokenize(wh, wh.cfg, _vocab_dir(args, wh), args.max_len or wh.cfg.model.max_len)
    print(json.dumps(result, default=str))
    return 0


def cmd_pretrain(args) -> int:
    # the job's modules load when it runs (module note above)
    from bertxml.training.pretrain import run_pretrain

    wh = open_warehouse(args, "pretrain")
    out = run_pretrain(wh, wh.cfg, _vocab_dir(args, wh), args.out, args.corpus or wh.cfg.vocab.corpus)
    print(out)
    return 0


def cmd_train(args) -> int:
    # the job's modules load when it runs (module note above)
    from bertxml.retrain import init_checkpoint
    from bertxml.training.train import run_train

    if args.model in ("logreg", "bilstm"):  # the paper's baselines (bertxml.training.baselines)
        # the job's modules load when it runs (module note above)
        from bertxml.training.baselines import run_train_baseline

        if args.init or args.encoder or args.resume:
            print(f"error: --init/--encoder/--resume are for the BERT models, not {args.model}", file=sys.stderr)
            return 2
        wh = open_warehouse(args, "train")
        print(run_train_baseline(wh, wh.cfg, args.model, out_dir=args.out))
        return 0
    wh = open_warehouse(args, "train")
    if args.init:  # --init is train.init for this run: a checkpoint folder, or "minilm"
        wh.cfg.train.init = args.init
    init = None if args.encoder else init_checkpoint(wh.cfg)  # --encoder: our own pretrained encoder wins
    out = run_train(wh, wh.cfg, model_kind=args.model, init=init, out_dir=args.out,
                    encoder_dir=args.encoder, resume=args.resume)
    print(out)
    return 0


def cmd_compare(args) -> int:
    # the job's modules load when it runs (module note above)
    from bertxml.reports.compare import run_compare

    wh = open_warehouse(args, "compare")
    result = run_compare(wh, wh.cfg, models=args.models, max_lens=args.max_lens, split=args.split,
                         encoder_dir=args.encoder, vocab_dir=args.vocab)
    print(result["markdown"])
    print(json.dumps({k: v for k, v in result.items() if k not in ("markdown", "rows")}, default=str))
    return 0


def cmd_retrain(args) -> int:
    # the job's modules load when it runs (module note above)
    from bertxml.retrain import run_retrain

    wh = open_warehouse(args, "retrain")
    out = run_retrain(wh, wh.cfg, as_of_run=args.as_of_run, as_of_timestamp=args.as_of_timestamp,
                      notes_source=args.notes, diagnoses_source=args.diagnoses, out_dir=args.out)
    print(out)
    return 0


def _model_dir(args, wh) -> str | None:
    """--model (a folder or models:/NAME@ALIAS), else score.model_dir from the config, else None: the
    registry's score.default_alias where there is a registry, else the newest under WORKDIR/models
    (`bertxml.models.registry.resolve_model`)."""
    return args.model or wh.cfg.score.model_dir or None


def cmd_score(args) -> int:
    # the job's modules load when it runs (module note above)
    from bertxml.scoring.score import run_score

    wh = open_warehouse(args, "score")
    result = run_score(wh, wh.cfg, date=args.date, since_last=args.since_last, model_dir=_model_dir(args, wh),
                       notes_source=args.notes)
    print(json.dumps(result, default=str))
    return 0


def cmd_evaluate(args) -> int:
    # the job's modules load when it runs (module note above)
    from bertxml.reports.evaluate import run_evaluate, run_evaluate_aliases

    wh = open_warehouse(args, "evaluate")
    if args.compare:
        if args.model:
            print("error: give --model or --compare, not both", file=sys.stderr)
            return 2
        result = run_evaluate_aliases(wh, wh.cfg, args.compare, split=args.split, date=args.date,
                                      date_from=args.date_from, date_to=args.date_to, notes_source=args.notes,
                                      diagnoses_source=args.diagnoses)
        print(result["markdown"])
        print(json.dumps({k: v for k, v in result.items() if k != "markdown"}, default=str))
        return 0
    result = run_evaluate(wh, wh.cfg, split=args.split, date=args.date, date_from=args.date_from,
                          date_to=args.date_to, model_dir=_model_dir(args, wh), notes_source=args.notes,
                          diagnoses_source=args.diagnoses, level=args.level)
    print(json.dumps(result, default=str))
    return 0


def cmd_promote(args) -> int:
    # the job's modules load when it runs (module note above)
    from bertxml.models.registry import run_promote

    wh = open_warehouse(args, "promote")
    print(json.dumps(run_promote(wh, wh.cfg, args.version, alias=args.alias, model_name=args.model_name),
                     default=str))
    return 0


def cmd_explain(args) -> int:
    # the job's modules load when it runs (module note above)
    from bertxml.reports.explain import run_explain

    wh = open_warehouse(args, "explain")
    result = run_explain(wh, wh.cfg, args.note_id, code=args.code, model_dir=_model_dir(args, wh),
                         html_path=args.html)
    return 0 if result else 1


def cmd_sql_server(args) -> int:
    # the job's modules load when it runs (module note above)
    from bertxml.platform.sqlserver import UnsafeServerError, check_bind, hash_password, serve, server_jar

    if args.hash_password:
        # From the terminal without echo, or one line on stdin (scripts); never from the command line.
        password = getpass.getpass(f"password for {args.hash_password}: ") if sys.stdin.isatty() \
            else sys.stdin.readline().rstrip("\n")
        try:
            print(hash_password(args.hash_password, password))
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        return 0
    if args.allow_text:
        args.set = (args.set or []) + ["sqlserver.allow_text=true"]
    cfg = load_config(args.conf, args.set)
    try:  # before Spark starts: an unsafe bind is refused at once
        check_bind(args.host, cfg.sqlserver.password_file)
    except UnsafeServerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # The guard and authenticator classes go on the JVM's system class path, so they must exist before
    # the JVM starts: Hive loads the authenticator by name at every login, from whichever thread takes it.
    wh = open_warehouse(args, "sql-server", class_path=(str(server_jar()),))
    serve(wh, port=args.port, host=args.host)
    return 0


def cmd_demo(args) -> int:
    # the job's modules load when it runs (module note above)
    from bertxml.demo import run_demo

    args.conf = args.conf or [str(CONF_DIR / "local.yaml")]  # the embedded default
    wh = open_warehouse(args, "demo")
    return run_demo(wh)


# ---- parser ------------------------------------------------------------------------------------------
class RemovedOption(argparse.Action):
    """An option that no longer exists: using it is bad usage (exit 2) with a message naming what replaces
    it, so an old script stops rather than running without it."""

    def __init__(self, option_strings, dest, replacement: str, reason: str, **kwargs):
        self.replacement, self.reason = replacement, reason
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string} was removed ({self.reason}): use {self.replacement}")


MODEL_HELP = ("model folder or registered model (models:/bertxml@champion, models:/bertxml/3); default: "
              "score.model_dir, else models:/<mlflow.model_name>@<score.default_alias> where a registry is "
              "configured, else the newest under WORKDIR/models")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--workdir", default="warehouse", help="warehouse root (default ./warehouse)")
    common.add_argument("--conf", action="append", default=[], metavar="FILE|NAME",
                        help="YAML config over the defaults (repeatable, later wins): a path, or the name "
                             "of one shipped in bertxml/conf/ (local, prod, codiesp)")
    common.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value (repeatable)")
    common.add_argument("-v", "--verbose", action="store_true")

    inputs = argparse.ArgumentParser(add_help=False)
    inputs.add_argument("--notes", metavar="SOURCE", help="notes: a table name or parquet:/csv:/delta:PATH")
    inputs.add_argument("--diagnoses", metavar="SOURCE", help="diagnoses: a table name or parquet:/csv:/delta:PATH")
    as_of = inputs.add_mutually_exclusive_group()
    as_of.add_argument("--as-of-run", metavar="RUN_ID",
                       help="replay an etl run: every input at the Delta version it read (bertxml.job_runs)")
    as_of.add_argument("--as-of-timestamp", metavar="T",
                       help="read every input Delta table as of this time (UTC unless it has an offset)")
    inputs.add_argument("--as-of-version", action=RemovedOption, nargs="?", help=argparse.SUPPRESS,
                        replacement="--as-of-run RUN_ID (the etl run whose inputs to read again) or --as-of-timestamp T",
                        reason="one version number cannot pin two tables")

    parser = argparse.ArgumentParser(prog="bertxml", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", parents=[common], help="write a synthetic EHR warehouse")
    p.add_argument("--notes", type=int, help="number of notes (generate.notes)")
    p.add_argument("--seed", type=int, help="random seed (generate.seed)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("etl", parents=[common, inputs], help="filter, label, impute, split (paper §4.1)")
    p.add_argument("--min-code-count", type=int, help="label vocabulary threshold (etl.min_code_count)")
    p.set_defaults(func=cmd_etl)

    corpus = argparse.ArgumentParser(add_help=False)
    corpus.add_argument("--corpus", action="append", metavar="SOURCE",
                        help="unlabelled text (table or parquet:PATH with a text column), repeatable")
    sized = argparse.ArgumentParser(add_help=False)
    sized.add_argument("--size", choices=["tiny", "small", "big"], help="model preset (bertxml/conf/model/SIZE.yaml)")

    p = sub.add_parser("vocab", parents=[common, corpus], help="train the EHR WordPiece vocabulary")
    p.add_argument("--out", help="vocabulary folder (default WORKDIR/vocab)")
    p.set_defaults(func=cmd_vocab)

    p = sub.add_parser("tokenize", parents=[common], help="tokenise and chunk labeled notes into bertxml.chunks")
    p.add_argument("--vocab", help="vocabulary folder (default WORKDIR/vocab)")
    p.add_argument("--max-len", type=int, help="chunk length in tokens (model.max_len)")
    p.set_defaults(func=cmd_tokenize)

    p = sub.add_parser("pretrain", parents=[common, corpus, sized], help="MLM + NSP pretraining from scratch")
    p.add_argument("--vocab", help="vocabulary folder (default WORKDIR/vocab)")
    p.add_argument("--out", help="encoder folder (default WORKDIR/models/encoder-SIZE-TIME)")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("train", parents=[common, sized], help="fine-tune for ICD coding")
    p.add_argument("--model", choices=["bertxml", "cls", "logreg", "bilstm"], default="bertxml",
                   help="ICD head, or one of the paper's baselines (logreg, bilstm)")
    p.add_argument("--encoder", help="our pretrained encoder folder (default: the newest)")
    p.add_argument("--init", help="start from an HF BERT checkpoint folder, or 'minilm' (default: train.init)")
    p.add_argument("--out", help="model folder (default WORKDIR/models/MODEL_VERSION)")
    p.add_argument("--resume", action="store_true", help="continue from the folder's last checkpoint")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("retrain", parents=[common, inputs, sized],
                       help="ETL -> vocabulary -> pretraining -> fine-tuning -> evaluation, from a snapshot")
    p.add_argument("--out", help="model folder (default WORKDIR/models/MODEL_VERSION)")
    p.set_defaults(func=cmd_retrain)

    p = sub.add_parser("score", parents=[common], help="score a night's notes into bertxml.predictions")
    p.add_argument("--date", help="note_date to score (default: yesterday, UTC)")
    p.add_argument("--since-last", action="store_true",
                   help="rescore every night holding a note this model has neither scored nor rejected")
    p.add_argument("--model", help=MODEL_HELP)
    p.add_argument("--notes", metavar="SOURCE", help="notes: a table name or parquet:/csv:/delta:PATH")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("evaluate", parents=[common], help="AUC reports into bertxml.auc_report/code_auc")
    p.add_argument("--split", choices=["dev", "test"])
    p.add_argument("--date")
    p.add_argument("--from", dest="date_from")
    p.add_argument("--to", dest="date_to")
    p.add_argument("--model", help=MODEL_HELP)
    p.add_argument("--compare", metavar="ALIAS,ALIAS",
                   help="evaluate each registry alias (e.g. champion,challenger) on the same notes, side by side")
    p.add_argument("--notes", metavar="SOURCE")
    p.add_argument("--diagnoses", metavar="SOURCE")
    p.add_argument("--level", choices=["note", "encounter", "both"], default="note",
                   help="note: each note against its labels; encounter: each encounter's max over its notes "
                        "against the encounter's codes (datasets 'encounter:...'); both: the two side by side")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("compare", parents=[common],
                       help="train and measure the paper's Table 2/3 models into bertxml.model_comparison")
    p.add_argument("--models", help="comma list from logreg,bilstm,cls,bertxml,minilm (compare.models)")
    p.add_argument("--max-lens", help="comma list of chunk lengths for the BERT rows, e.g. 512,1024")
    p.add_argument("--split", choices=["dev", "test"], help="where every model is measured (compare.split)")
    p.add_argument("--encoder", help="our pretrained encoder folder (default: the newest encoder-* folder)")
    p.add_argument("--vocab", help="vocabulary folder for missing chunk lengths (default WORKDIR/vocab)")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("promote", parents=[common],
                       help="point a registry alias (champion, challenger) at a registered model version")
    p.add_argument("version", help="the registered version number (see the train/retrain output)")
    p.add_argument("--alias", default="champion", help="the alias to move (default champion)")
    p.add_argument("--model-name", help="registered model (default mlflow.model_name)")
    p.set_defaults(func=cmd_promote)

    p = sub.add_parser("explain", parents=[common], help="label attention for one note (shows PHI: opt-in)")
    p.add_argument("note_id")
    p.add_argument("--code")
    p.add_argument("--model", help=MODEL_HELP)
    p.add_argument("--html", help="write an attention-shaded HTML rendering here")
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("sql", parents=[common], help="run Spark SQL over the warehouse")
    p.add_argument("query")
    p.add_argument("--format", choices=["table", "csv", "json"], default="table")
    p.set_defaults(func=cmd_sql)

    p = sub.add_parser("sql-server", parents=[common], help="Thrift JDBC/ODBC server over the warehouse")
    p.add_argument("--port", type=int, default=10000)
    p.add_argument("--host", default="localhost",
                   help="address to listen on; not a loopback one only with sqlserver.password_file set")
    p.add_argument("--allow-text", action="store_true",
                   help="also serve the tables that hold note text (sqlserver.allow_text; PHI: opt-in)")
    p.add_argument("--hash-password", metavar="USER",
                   help="print a password-file line for USER (password from the terminal or stdin) and exit")
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
        etl = sys.modules.get("bertxml.etl.etl")  # loaded when the error came from it
        if etl is not None and isinstance(exc, etl.ReplayError):  # an --as-of-run with no run to replay
            print(f"error: {exc}", file=sys.stderr)
            return 2
        log.error("%s failed: %s: %s", args.command, type(exc).__name__, exc)
        if args.verbose:
            raise
        return 1


if __name__ == "__main__":
    sys.exit(main())
