"""The deploy path: configs shipped in the package, conf/prod.yaml, the job definitions in deploy/ (each
command parsed by bertxml's own parser), and a built wheel that runs a job from outside the repository."""
import argparse
import ast
import datetime as dt
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from bertxml import config as config_module
from bertxml.cli import build_parser
from bertxml.config import CONF_DIR, ConfigError
from bertxml.config_io import load_config, packaged_configs

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
SHELL_OPERATORS = set("();<>|&")


# ---- helpers: a bertxml command line out of a shell line, checked by the real parser --------------------
def bertxml_argv(shell_line: str) -> list[str]:
    """The arguments after the `bertxml` program in a shell command line, up to the first operator or
    redirection (`&&`, `>>`, `|`, ...)."""
    lexer = shlex.shlex(shell_line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    tokens = list(lexer)
    starts = [i for i, tok in enumerate(tokens) if Path(tok).name == "bertxml"]
    assert starts, f"no bertxml program in {shell_line!r}"
    argv = []
    for tok in tokens[starts[0] + 1:]:
        if set(tok) <= SHELL_OPERATORS:
            break
        argv.append(tok)
    return argv


def check_bertxml_command(argv: list[str]):
    """Parse argv with bertxml's parser and resolve its config (packaged names, --set keys): what the job
    would do before touching Spark. Fails the test naming the command on any problem."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit:
        pytest.fail(f"bertxml rejects {argv}")
    # argparse also takes unambiguous abbreviations (--dat for --date): a job file spells options out, so a
    # later option sharing the prefix cannot change what it means
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    known = subparsers.choices[args.command]._option_string_actions
    inexact = [tok for tok in argv if tok.startswith("-") and tok.partition("=")[0] not in known]
    assert not inexact, f"bertxml {argv}: options not spelled out: {inexact}"
    try:
        cfg = load_config(args.conf, args.set, getattr(args, "size", None))
    except ConfigError as exc:
        pytest.fail(f"bertxml {argv}: config error: {exc}")
    for option in ("date", "date_from", "date_to"):
        if getattr(args, option, None):
            dt.date.fromisoformat(getattr(args, option))
    return args, cfg


def render_airflow_template(command: str, ds: str = "2025-06-10") -> str:
    """Render the two Jinja expressions the DAG uses; any other template is left and fails the test."""
    day = dt.date.fromisoformat(ds)
    command = re.sub(r"\{\{\s*ds\s*\}\}", ds, command)
    command = re.sub(r"\{\{\s*macros\.ds_add\(ds,\s*(-?\d+)\)\s*\}\}",
                     lambda m: (day + dt.timedelta(days=int(m.group(1)))).isoformat(), command)
    assert "{{" not in command, f"an Airflow template this test does not render: {command}"
    return command


def eval_string(node, names: dict) -> str:
    """Evaluate the string expressions a DAG builds commands with: literals, module constants, `+` and
    str.format with literal keywords. Anything else fails the test (it could not be checked)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.Name) and node.id in names:
        return names[node.id]
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return eval_string(node.left, names) + eval_string(node.right, names)
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "format"
            and not node.args):
        template = eval_string(node.func.value, names)
        return template.format(**{kw.arg: eval_string(kw.value, names) for kw in node.keywords})
    pytest.fail(f"cannot evaluate the DAG expression {ast.unparse(node)}")


def airflow_commands(path: Path) -> dict[str, str]:
    """{task_id: bash_command} of every BashOperator in a DAG file, read with ast (no Airflow needed)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names = {}
    for stmt in tree.body:
        if (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name)
                and isinstance(stmt.value, ast.Constant) and isinstance(stmt.value.value, str)):
            names[stmt.targets[0].id] = stmt.value.value
    commands = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "BashOperator":
            kwargs = {kw.arg: kw.value for kw in node.keywords}
            commands[eval_string(kwargs["task_id"], names)] = eval_string(kwargs["bash_command"], names)
    return commands


# ---- configs shipped in the package ----------------------------------------------------------------------
def test_configs_live_in_the_package_and_conf_points_to_them():
    assert CONF_DIR == Path(config_module.__file__).resolve().parent / "conf"
    assert {"local", "prod", "codiesp"} <= set(packaged_configs())
    assert sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml")) == ["big", "small", "tiny"]
    # one source of truth: the repository's conf/ is the package's folder, not a copy
    assert (REPO / "conf").resolve() == CONF_DIR


def test_conf_takes_a_packaged_name_or_a_path(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # nowhere near the repository
    assert load_config(["local"]).vocab.size == 8000
    assert load_config(["prod"]).warehouse.catalog == "metastore"
    assert load_config(None, None, size="big").model.num_hidden_layers == 12
    with pytest.raises(ConfigError, match=r"no packaged config 'prodd'; choose one of \[.*'prod'"):
        load_config(["prodd"])
    with pytest.raises(ConfigError, match="config file not found: prod.yaml"):
        load_config(["prod.yaml"])  # a suffix makes it a path: not silently the packaged one
    (tmp_path / "site.yaml").write_text("warehouse:\n  notes: site.notes\n")
    assert load_config(["prod", "site.yaml"]).warehouse.notes == "site.notes"  # later wins
    monkeypatch.chdir(REPO)  # the README's and Makefile's paths from the repository root
    assert load_config(["conf/local.yaml"]).to_dict() == load_config(["local"]).to_dict()
    assert load_config(["conf/codiesp.yaml"]).vocab.size == 12000


def test_prod_yaml_loads_and_every_key_is_commented():
    text = (CONF_DIR / "prod.yaml").read_text()
    cfg = load_config(["prod"])  # unknown sections or keys would raise
    assert cfg.warehouse.catalog == "metastore" and cfg.warehouse.notes.count(".") == 2
    assert cfg.warehouse.schema.count(".") == 1 and cfg.score.device == "auto"
    assert cfg.spark.conf["spark.task.resource.gpu.amount"] == "1"
    assert cfg.model.hidden_size == 768  # model_size: big
    data = yaml.safe_load(text)
    keys = {k for section in data.values() if isinstance(section, dict) for k in section}
    assert {"notes", "diagnoses", "schema", "model_dir", "conf"} <= keys
    uncommented = [line for line in text.splitlines()
                   if re.match(r"\s*[\w.]+:", line) and "#" not in line and not line.rstrip().endswith(":")]
    assert not uncommented, f"prod.yaml lines without a comment: {uncommented}"


def test_score_model_dir_from_the_config_pins_the_model(tmp_path):
    from bertxml.cli import _model_dir

    class Wh:
        cfg = load_config(["prod"], [f"score.model_dir={tmp_path}"])

    args = build_parser().parse_args(["score", "--conf", "prod"])
    assert _model_dir(args, Wh) == str(tmp_path)
    args = build_parser().parse_args(["score", "--conf", "prod", "--model", "/m"])
    assert _model_dir(args, Wh) == "/m"  # the command line wins


# ---- the job definitions in deploy/ ----------------------------------------------------------------------
def test_airflow_dag_compiles_and_runs_real_commands():
    path = DEPLOY / "bertxml_nightly.py"
    compile(path.read_text(), str(path), "exec")  # a syntax error fails here, without Airflow
    commands = airflow_commands(path)
    assert set(commands) == {"score", "evaluate"}
    parsed = {task: check_bertxml_command(bertxml_argv(render_airflow_template(cmd)))
              for task, cmd in commands.items()}
    score, evaluate = parsed["score"][0], parsed["evaluate"][0]
    assert score.command == "score" and score.date == "2025-06-10" and score.conf == ["prod"]
    assert evaluate.command == "evaluate" and evaluate.date == "2025-06-03"
    assert parsed["score"][1].warehouse.catalog == "metastore"


def test_crontab_line_is_valid_cron_and_a_real_command():
    lines = [line for line in (DEPLOY / "bertxml.crontab").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert lines[0] == "CRON_TZ=UTC"
    entries = [line for line in lines if not re.match(r"^\w+=", line)]
    assert len(entries) == 1
    fields = entries[0].split(None, 5)
    minute, hour, dom, month, dow, command = fields
    assert 0 <= int(minute) < 60 and 0 <= int(hour) < 24 and (dom, month, dow) == ("*", "*", "*")
    assert not re.search(r"(?<!\\)%", command), "an unescaped % ends a cron command"
    args, cfg = check_bertxml_command(bertxml_argv(command.replace("\\%", "%")))
    assert args.command == "score" and args.date is None and not args.since_last  # yesterday (UTC)
    assert "||" in command and "mail" in command  # a failed night is reported


def test_databricks_job_parses_and_its_parameters_are_bertxml_options():
    job = json.loads((DEPLOY / "databricks-score-job.json").read_text())
    (task,) = job["tasks"]
    spark_task = task["spark_python_task"]
    entry = REPO / spark_task["python_file"]
    assert entry.exists(), f"{spark_task['python_file']} is not in the repository"
    # the entry point runs `bertxml <subcommand> *argv`: read the subcommand from its main([...]) call
    calls = [node for node in ast.walk(ast.parse(entry.read_text()))
             if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "main" and node.args]
    subcommand = calls[0].args[0].elts[0].value
    args, cfg = check_bertxml_command([subcommand, *spark_task["parameters"]])
    assert args.command == "score" and args.model and cfg.warehouse.catalog == "metastore"
    # the cluster gives each task the GPU that prod.yaml's spark.conf asks for
    cluster = {c["job_cluster_key"]: c["new_cluster"] for c in job["job_clusters"]}[task["job_cluster_key"]]
    for key in ("spark.executor.resource.gpu.amount", "spark.task.resource.gpu.amount"):
        assert cluster["spark_conf"][key] == cfg.spark.conf[key]
    assert job["schedule"]["timezone_id"] == "UTC"


def test_readme_shows_the_deploy_files_not_copies():
    readme = (REPO / "README.md").read_text()
    for name in ("deploy/bertxml_nightly.py", "deploy/bertxml.crontab", "deploy/databricks-score-job.json",
                 "conf/prod.yaml"):
        assert name in readme, f"README does not name {name}"
    cron_line = [line for line in (DEPLOY / "bertxml.crontab").read_text().splitlines() if line.startswith("30 ")]
    assert cron_line[0] in readme  # the excerpt is the file's line, word for word
    assert "BashOperator(" not in readme and '"spark_python_task"' not in readme  # no second copy to drift


# ---- a built wheel, installed away from the repository --------------------------------------------------
def test_built_wheel_runs_a_job_from_outside_the_repository(tmp_path):
    """Build the wheel from a copy of the sources (the checkout gets no build/ or egg-info), install it
    into a folder of its own and run `bertxml generate` there, with the repository off sys.path."""
    build_outputs = lambda: sorted(p.name for p in REPO.iterdir() if p.name == "build" or p.suffix == ".egg-info")  # noqa: E731
    before = build_outputs()
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(REPO / "setup.py", src)
    shutil.copytree(REPO / "bertxml", src / "bertxml", ignore=shutil.ignore_patterns("__pycache__"))
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                    "-q", "-w", str(dist), str(src)], check=True, capture_output=True, text=True)
    (wheel,) = dist.glob("*.whl")
    job = json.loads((DEPLOY / "databricks-score-job.json").read_text())
    assert wheel.name == Path(job["tasks"][0]["libraries"][0]["whl"]).name  # the job installs this wheel
    shipped = set(zipfile.ZipFile(wheel).namelist())
    for folder in ("conf", "resources"):
        for path in (REPO / "bertxml" / folder).rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts:
                assert path.relative_to(REPO).as_posix() in shipped, f"the wheel lacks {path.relative_to(REPO)}"

    site, run_dir = tmp_path / "site", tmp_path / "elsewhere"
    run_dir.mkdir()
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(site),
                    str(wheel)], check=True, capture_output=True, text=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(PYTHONPATH=str(site), PYTHONSAFEPATH="1")
    probe = ("import bertxml, json; from bertxml.config import CONF_DIR; "
             "from bertxml.config_io import load_config, packaged_configs; "
             "print(json.dumps({'file': bertxml.__file__, 'conf': str(CONF_DIR), 'names': packaged_configs(), "
             "'small': load_config(None, None, size='small').model.hidden_size, "
             "'prod': load_config(['prod']).warehouse.catalog}))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=run_dir, env=env, check=True,
                         capture_output=True, text=True).stdout
    found = json.loads(out)
    assert Path(found["file"]).is_relative_to(site) and Path(found["conf"]).is_relative_to(site)
    assert {"local", "prod", "codiesp"} <= set(found["names"])
    assert found["small"] == 512 and found["prod"] == "metastore"

    # the console script pip wrote for the wheel, run as a job with the packaged embedded default
    job = subprocess.run([str(site / "bin" / "bertxml"), "generate", "--notes", "40", "--workdir", "wh",
                          "--conf", "local", "--set", "spark.master=local[1]", "--set", "generate.partitions=1",
                          "--set", "spark.driver_memory=1g"],
                         cwd=run_dir, env=env, capture_output=True, text=True, timeout=300)
    assert job.returncode == 0, job.stderr[-3000:]
    result = json.loads(job.stdout.strip().splitlines()[-1])
    assert result["notes"] > 0 and result["diagnoses"] > 0
    assert (run_dir / "wh" / "tables" / "ehr" / "notes" / "_delta_log").is_dir()
    assert build_outputs() == before  # nothing left in the checkout
