"""The package's import graph: no cycle between bertxml modules, and no import of another module's private
name. Imports inside functions count: they hide a cycle from Python, not from a reader.

Run: .venv/bin/python -m pytest -q tests/test_imports.py   (or: python tests/test_imports.py, which prints)
"""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "bertxml"


def import_graph(package: Path = PACKAGE) -> tuple[dict[str, set[str]], list[str]]:
    """({module: the bertxml modules it imports anywhere in its file}, ["module imports bertxml.x._name"])."""
    modules = {p.stem for p in package.glob("*.py")}
    graph, private = {}, []
    for path in sorted(package.glob("*.py")):
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "bertxml":
                parts = node.module.split(".")
                if len(parts) == 1:                                    # from bertxml import tables
                    deps |= {a.name for a in node.names if a.name in modules}
                else:
                    deps.add(parts[1])
                    private += [f"{path.stem} imports {node.module}.{a.name}" for a in node.names
                                if a.name.startswith("_") and not a.name.startswith("__")]
            elif isinstance(node, ast.Import):
                deps |= {a.name.split(".")[1] for a in node.names if a.name.startswith("bertxml.")}
        graph[path.stem] = deps & modules - {path.stem}
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


def test_the_cycle_finder_finds_one():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_in_bertxml():
    graph, _ = import_graph()
    assert {"score", "baselines", "train", "metrics"} <= set(graph)     # the walk saw the package
    assert "metrics" in graph["train"] and "score" not in graph["baselines"]
    assert cycles(graph) == [], f"import cycles in bertxml: {cycles(graph)}"


def test_no_import_of_private_names():
    _, private = import_graph()
    assert private == []


if __name__ == "__main__":
    graph, private = import_graph()
    for module in sorted(graph):
        print(f"{module}: {', '.join(sorted(graph[module])) or '-'}")
    print("cycles:", cycles(graph) or "none")
    print("private names imported:", private or "none")
