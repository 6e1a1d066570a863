"""The package's shape: no import cycle among memkd's modules, and no module too long to read.

Both tests read the sources with ``ast`` (nothing is imported), so they hold for every import,
top-level or inside a function, including those that only run on some paths.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Optional

PACKAGE = Path(__file__).resolve().parents[1] / "memkd"
MAX_LINES = 400
REASON = "over 400 lines because"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def memkd_modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _resolve_relative(importer: str, is_package: bool, level: int, module: Optional[str]) -> str:
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    base = base[: len(base) - (level - 1)] if level > 1 else base
    return ".".join(base + ([module] if module else []))


def imported_modules(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, int]]:
    """(memkd module, line) of every import in the module's source, wherever it is written.
    ``from P import x`` counts as importing P.x where that is a module, else P."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            source = node.module or ""
            if node.level:
                source = _resolve_relative(name, path.name == "__init__.py", node.level, node.module)
            for alias in node.names:
                candidate = f"{source}.{alias.name}"
                found.append((candidate if candidate in modules else source, node.lineno))
    return [(target, line) for target, line in found if target == "memkd" or target.startswith("memkd.")]


def import_graph() -> dict[str, dict[str, int]]:
    """{module: {module it imports: line}}. Importing memkd.a.b runs memkd/a/__init__.py first,
    so it imports memkd.a too, unless the importer lives in memkd.a (its package is loading)."""
    modules = memkd_modules()
    graph: dict[str, dict[str, int]] = {name: {} for name in modules}
    for name, path in modules.items():
        own_packages = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
        for target, line in imported_modules(name, path, modules):
            parts = target.split(".")
            for depth in range(2, len(parts) + 1):  # memkd itself imports nothing of its own
                reached = ".".join(parts[:depth])
                if reached in modules and reached != name and reached not in own_packages:
                    graph[name].setdefault(reached, line)
    return graph


def find_cycle(graph: dict[str, dict[str, int]]) -> Optional[list[str]]:
    """One cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> Optional[list[str]]:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_no_import_cycle():
    graph = import_graph()
    assert sum(map(len, graph.values())) > 20, "the graph holds almost no imports: the parsing is broken"
    cycle = find_cycle(graph)
    if cycle:
        steps = [f"{a} (line {graph[a][b]}) -> {b}" for a, b in zip(cycle, cycle[1:])]
        raise AssertionError("import cycle: " + "; ".join(steps))


def test_cycle_finder_reports_a_cycle():
    graph = {"memkd.a": {"memkd.b": 3}, "memkd.b": {"memkd.c": 5}, "memkd.c": {"memkd.a": 7}, "memkd.d": {}}
    assert find_cycle(graph) == ["memkd.a", "memkd.b", "memkd.c", "memkd.a"]
    assert find_cycle({"memkd.a": {"memkd.b": 1}, "memkd.b": {}}) is None


def test_imports_are_resolved_to_modules(tmp_path):
    source = tmp_path / "y.py"
    source.write_text(
        "import os\nfrom memkd import x, VERSION\n\ndef f():\n    from . import z\n    from ..w import thing\n"
        "    import memkd.x.z as alias\n"
    )
    modules = dict.fromkeys(["memkd", "memkd.x", "memkd.x.y", "memkd.x.z", "memkd.w"])
    assert imported_modules("memkd.x.y", source, modules) == [
        ("memkd.x", 2), ("memkd", 2), ("memkd.x.z", 5), ("memkd.w", 6), ("memkd.x.z", 7),
    ]


def test_no_module_over_400_lines_without_a_reason():
    too_long = []
    for name, path in memkd_modules().items():
        text = path.read_text()
        lines = len(text.splitlines())
        docstring = ast.get_docstring(ast.parse(text)) or ""
        if lines > MAX_LINES and REASON not in " ".join(docstring.split()):
            too_long.append(f"{path.relative_to(PACKAGE.parent)}: {lines} lines")
    assert not too_long, f"modules over {MAX_LINES} lines whose docstring does not say why ('{REASON} ...'): {too_long}"
