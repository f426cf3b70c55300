"""The layout's rules, read from the source: imports run one way, and no module imports itself back.

Every import counts, also one inside a function: a late import that breaks a cycle at run time is
still a cycle in the design.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("common", "client", "server", "simulations", "benchmarks")
# What each package may import from the project besides itself.
ALLOWED = {
    "common": set(),
    "client": {"common"},
    "server": {"common"},
    "simulations": {"common", "client", "server"},  # the launcher: it starts both roles
    "benchmarks": {"common", "client", "server", "simulations"},
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The project modules a file imports (`from pkg import mod` resolves to pkg.mod when it exists)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                found.add(candidate if candidate in modules else node.module)
    return {name for name in found if name.split(".")[0] in PACKAGES}


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    return {name: _imports(path, set(files)) - {name} for name, path in files.items()}


def role_violations(graph: dict[str, set[str]]) -> list[str]:
    return [
        f"{module} imports {target}"
        for module, targets in sorted(graph.items())
        for target in sorted(targets)
        if target.split(".")[0] not in ALLOWED[module.split(".")[0]] | {module.split(".")[0]}
    ]


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[list[str]] = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                cycles.append([*path[path.index(target) :], target])
            elif target in graph and target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    return cycles


def test_roles_import_one_way():
    assert role_violations(_graph()) == []


def test_no_import_cycles():
    assert import_cycles(_graph()) == []


def test_the_rules_see_a_violation(tmp_path, monkeypatch):
    """The checks above are not vacuous: a server module importing client code, and back, is caught."""
    for pkg in PACKAGES:
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / "client" / "a.py").write_text("def late():\n    from server import b\n")
    (tmp_path / "server" / "b.py").write_text("import client.a\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    graph = _graph()
    assert role_violations(graph) == ["client.a imports server.b", "server.b imports client.a"]
    assert import_cycles(graph) == [["client.a", "server.b", "client.a"]]
