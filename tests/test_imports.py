"""The package's import graph: subpackages by pipeline stage, imports one way between them, no cycle between
bertxml modules, no import of another module's private name, and no module over 500 lines. Imports inside
functions count: they hide a cycle from Python, not from a reader. An import inside a function says why it is
not at the top of its module, in a comment on its line or just above it.

Run: .venv/bin/python -m pytest -q tests/test_imports.py   (or: python tests/test_imports.py, which prints)
"""
import ast
from pathlib import Path


PACKAGE = Path(__file__).resolve().parent.parent / "bertxml"
MAX_LINES = 500

# Which stages a stage may import (besides itself). The foundation is bertxml's own __init__, config and the
# array metrics; the application is the command line and the two jobs that run every stage (demo, retrain).
FOUNDATION = {"__init__", "config", "config_io", "metrics"}
APPLICATION = {"cli", "demo", "retrain"}
MAY_IMPORT = {
    "foundation": set(),
    "platform": {"foundation"},
    "etl": {"foundation", "platform"},
    "text": {"foundation", "platform"},
    "models": {"foundation", "platform", "text"},
    "training": {"foundation", "platform", "etl", "text", "models"},
    "scoring": {"foundation", "platform", "etl", "text", "models"},
    "reports": {"foundation", "platform", "etl", "text", "models", "training", "scoring"},
    "application": {"foundation", "platform", "etl", "text", "models", "training", "scoring", "reports"},
}


def module_names(package: Path = PACKAGE) -> dict[str, Path]:
    """{dotted name under bertxml ("scoring.engine", "config", a package's "__init__" as "scoring"): file}."""
    names = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package).with_suffix("").parts
        if "resources" in parts:                                       # loaded by MLflow by file path
            continue
        if parts[-1] == "__init__":
            parts = parts[:-1] or ("__init__",)
        names[".".join(parts)] = path
    return names


def stage(module: str) -> str:
    """The stage a module belongs to: its subpackage, or foundation / application for top-level modules."""
    head = module.split(".")[0]
    if head in FOUNDATION:
        return "foundation"
    if head in APPLICATION:
        return "application"
    return head


def import_graph(package: Path = PACKAGE) -> tuple[dict[str, set[str]], list[str]]:
    """({module: the bertxml modules it imports anywhere in its file}, ["module imports bertxml.x._name"])."""
    modules = module_names(package)
    graph, private = {}, []

    def resolve(dotted: str) -> str | None:
        """The longest bertxml module that `dotted` (under bertxml) names or lies in."""
        parts = dotted.split(".")
        for n in range(len(parts), 0, -1):
            if ".".join(parts[:n]) in modules:
                return ".".join(parts[:n])
        return "__init__" if not dotted else None

    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "bertxml":
                base = node.module.partition(".")[2]                   # "" for `from bertxml import x`
                for alias in node.names:
                    deps.add(resolve(f"{base}.{alias.name}".lstrip(".")) or resolve(base))
                    if alias.name.startswith("_") and not alias.name.startswith("__"):
                        private.append(f"{name} imports {node.module}.{alias.name}")
            elif isinstance(node, ast.Import):
                deps |= {resolve(a.name.partition(".")[2]) for a in node.names if a.name.startswith("bertxml.")}
        graph[name] = {d for d in deps if d} - {name}
    return graph, private


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def wrong_way(graph: dict[str, set[str]]) -> list[str]:
    """Each import of a stage that the importer's stage may not import: ["training.train -> scoring.drift"]."""
    return [f"{m} -> {d}" for m in sorted(graph) for d in sorted(graph[m])
            if stage(d) != stage(m) and stage(d) not in MAY_IMPORT[stage(m)]]


def too_long(package: Path = PACKAGE) -> list[str]:
    return [f"{name} ({n} lines)" for name, path in module_names(package).items()
            if (n := len(path.read_text().splitlines())) > MAX_LINES]


def imports_without_reason(source: str, filename: str = "<source>") -> list[int]:
    """Line numbers of the imports inside a function (nested ones too) with no comment saying why: a comment
    counts on the import's own lines, or on the line above it or above the run of imports it belongs to
    (import statements and blank lines), so one comment can cover a block of imports."""
    tree = ast.parse(source, filename)
    lines = source.splitlines()
    imports = [node for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
               for node in ast.walk(fn) if isinstance(node, (ast.Import, ast.ImportFrom))]
    import_lines = {n for node in imports for n in range(node.lineno, node.end_lineno + 1)}
    missing = set()
    for node in imports:
        if any("#" in lines[n - 1] for n in range(node.lineno, node.end_lineno + 1)):
            continue                                # an import statement holds no string: "#" starts a comment
        above = node.lineno - 1
        while above >= 1 and (above in import_lines or not lines[above - 1].strip()):
            above -= 1
        if above < 1 or not lines[above - 1].strip().startswith("#"):
            missing.add(node.lineno)
    return sorted(missing)


def function_imports_without_reason(package: Path = PACKAGE) -> list[str]:
    """["bertxml/x.py:LINE"] for each import inside a function of the package that says no reason."""
    found = []
    for path in sorted(package.rglob("*.py")):
        name = path.relative_to(package.parent).as_posix()
        found += [f"{name}:{n}" for n in imports_without_reason(path.read_text(), str(path))]
    return found


def test_the_cycle_finder_finds_one():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_stage_rule_catches_an_upward_import():
    assert wrong_way({"text.data": {"models.bert", "platform.tables"}, "models.bert": {"config"}}) == \
        ["text.data -> models.bert"]
    assert wrong_way({"reports.evaluate": {"scoring.score"}, "cli": {"reports.evaluate"}}) == []


def test_the_walk_sees_every_stage():
    graph, _ = import_graph()
    assert {stage(m) for m in graph} == set(MAY_IMPORT)
    assert "metrics" in graph["training.train"] and "platform.tables" in graph["platform.runs"]


def test_no_import_cycle_in_bertxml():
    graph, _ = import_graph()
    assert cycles(graph) == [], f"import cycles in bertxml: {cycles(graph)}"


def test_imports_go_one_way_between_stages():
    graph, _ = import_graph()
    assert wrong_way(graph) == [], f"imports against the stage order: {wrong_way(graph)}"


def test_no_import_of_private_names():
    _, private = import_graph()
    assert private == [], f"private names imported: {private}"


def test_the_import_check_wants_a_reason():
    source = (
        "import os\n"
        "def a():\n    import json\n    return json\n"                         # no reason: line 3
        "def b():\n    import torch  # only on a worker\n"                      # on its line
        "def c():\n    # mlflow after the env is set\n    import mlflow\n\n    from mlflow import x\n"  # a block
        "def d():\n    x = 1\n\n    import yaml\n"                            # code above: line 15
        "def e():\n    def inner():\n        from a import (b,\n                       c)\n"  # nested: line 18
    )
    assert imports_without_reason(source) == [3, 15, 18]


def test_imports_inside_functions_say_why():
    found = function_imports_without_reason()
    assert found == [], (f"{len(found)} imports inside functions without a comment saying why (move them to the "
                         f"top of the module, or say why not on the line above): {found}")


def test_no_module_over_500_lines():
    assert too_long() == [], f"modules over {MAX_LINES} lines: {too_long()}"


if __name__ == "__main__":
    graph, private = import_graph()
    for module in sorted(graph):
        print(f"{module}: {', '.join(sorted(graph[module])) or '-'}")
    print("cycles:", cycles(graph) or "none")
    print("imports against the stage order:", wrong_way(graph) or "none")
    print("private names imported:", private or "none")
    print(f"modules over {MAX_LINES} lines:", too_long() or "none")
    print("imports inside functions without a reason:", function_imports_without_reason() or "none")
