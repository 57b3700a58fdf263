"""No import cycle inside src/webiptd: the modules form layers, so each can be read, tested and
replaced from the bottom up.

Every `import` and `from … import` of a webiptd module counts, wherever it is: at module level, inside
a function, or under `if TYPE_CHECKING:`. An import moved into a function or behind TYPE_CHECKING only
hides a cycle from the interpreter; the two modules still need each other.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"
PACKAGE = "webiptd"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement in `tree`, at any depth."""
    return [node for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))]


def import_graph() -> dict[str, set[str]]:
    """{module: the webiptd modules it imports}, each named as it is in sys.modules."""
    paths = {module_name(p): p for p in sorted((SRC / PACKAGE).rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        is_package = path.name == "__init__.py"
        targets: set[str] = set()
        for node in imports(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
                continue
            base = node.module or ""
            if node.level:  # relative: from the package this module is in
                anchor = name.split(".")
                anchor = anchor[:len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                # `from webiptd import config` imports the module webiptd.config; `from webiptd.x import f` imports x.
                submodule = f"{base}.{alias.name}"
                targets.add(submodule if submodule in paths else base)
        graph[name] = {t for t in targets if t in paths and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, …, a], or None; depth-first, in name order, so a failure is reproducible."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            cycle = visit(start)
            if cycle:
                return cycle
    return None


def test_the_graph_sees_the_imports_it_should() -> None:
    # A walker that found nothing would pass the cycle test below: check it sees known edges of each kind.
    graph = import_graph()
    assert "webiptd.cli" in graph["webiptd.__main__"]  # module level
    assert "webiptd.firewall.iptables" in graph["webiptd.firewall.backend"]  # in a function (make_backend)


def test_no_import_cycle_in_src() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_find_cycle_reports_the_cycle_and_imports_are_found_at_every_depth() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None
    source = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import x\ndef f():\n    import y\n"
    names = [alias.name for node in imports(ast.parse(source)) for alias in node.names]
    assert sorted(names) == ["TYPE_CHECKING", "x", "y"]


def test_only_the_fleet_module_imports_redis_and_only_the_daemon_imports_it_when_a_fleet_is_configured() -> None:
    """No fleet section, no Redis code: redis-py is imported by webiptd.fleet alone, which no module imports at
    module level; the daemon imports it inside run(), under `if config.fleet is not None`."""
    importers: dict[str, list[str]] = {}
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node in imports(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for name in names:
                if name == "redis" or name.startswith("redis."):
                    importers.setdefault("redis", []).append(module_name(path))
                if name == "webiptd.fleet":
                    top = node in tree.body
                    importers.setdefault("fleet", []).append(f"{module_name(path)}{' (module level)' if top else ''}")
    assert set(importers["redis"]) == {"webiptd.fleet"}
    assert importers["fleet"] == ["webiptd.daemon"]
    daemon = ast.parse((SRC / PACKAGE / "daemon.py").read_text(encoding="utf-8"))
    guarded = [node for node in ast.walk(daemon) if isinstance(node, ast.If)
               and ast.unparse(node.test) == "config.fleet is not None"
               and any(isinstance(i, ast.ImportFrom) and i.module == "webiptd.fleet" for i in imports(node))]
    assert len(guarded) == 1
