"""The package's import graph: subpackages by pipeline stage, imports one way between them, no cycle between
bertxml modules, no import of another module's private name, and no module over 500 lines. Imports inside
functions count: they hide a cycle from Python, not from a reader.

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
