"""The module layout ARCHITECTURE.md describes: entry points import only library modules, never each other;
library modules never import an entry point; no import cycles."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "vitfood"
ENTRY = {"train", "bench", "evaluate", "predict", "export", "audit", "shards", "tune"}
DRIVES = {"tune": {"train"}}  # the one entry point that runs another in its process: trials report each eval


def _imports():
    graph = {}
    for path in PACKAGE.glob("*.py"):
        if path.stem == "__init__":
            continue
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "vitfood":
                deps |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("vitfood."):
                deps.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                deps |= {a.name.split(".")[1] for a in node.names if a.name.startswith("vitfood.")}
        graph[path.stem] = deps
    return graph


def test_entry_points_and_library_modules_import_in_one_direction():
    graph = _imports()
    assert ENTRY <= graph.keys()
    for module, deps in graph.items():
        others = deps & ENTRY - DRIVES.get(module, set())
        assert not others, f"{module} imports the entry point(s) {others}"


def test_no_import_cycles():
    graph = _imports()
    done, active = set(), []

    def visit(m):
        assert m not in active, " -> ".join(active[active.index(m):] + [m])
        if m in done:
            return
        active.append(m)
        for d in graph.get(m, ()):
            visit(d)
        active.pop()
        done.add(m)

    for m in graph:
        visit(m)


def test_architecture_lists_every_module():
    text = (PACKAGE.parent / "ARCHITECTURE.md").read_text()
    assert all(f"`{m}.py`" in text for m in _imports()), "a module is missing from ARCHITECTURE.md"


def test_no_module_over_500_lines_and_no_function_over_80():
    long = []
    for path in PACKAGE.glob("*.py"):
        text = path.read_text()
        if len(text.splitlines()) > 500:
            long.append(f"{path.name}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80:
                long.append(f"{path.name}: {node.name} is {node.end_lineno - node.lineno + 1} lines")
    assert not long, long
