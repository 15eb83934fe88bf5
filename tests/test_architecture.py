"""The import graph: no circle between modules, no arrow up between floors.

The floors, bottom up: merge_core -> orchestrator -> flows (the product), then bench and deploy, which
use the product and never the reverse; nothing but tests imports tests. Every import statement counts,
including those inside functions: a lazy import is still a dependency, and still a circle when it
closes one. The graph is read from the source with ``ast``, so the test needs no import to succeed.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"merge_core": "supermerge.merge_core", "orchestrator": "supermerge.orchestrator",
            "flows": "supermerge.flows", "bench": "bench", "deploy": "deploy"}
"""Folder -> the dotted name its modules import as (pyproject maps the product's folders under supermerge)."""
FORBIDDEN: dict[str, frozenset[str]] = {
    "merge_core": frozenset({"orchestrator", "flows", "bench", "deploy", "tests"}),
    "orchestrator": frozenset({"flows", "bench", "deploy", "tests"}),
    "flows": frozenset({"bench", "deploy", "tests"}),
    "bench": frozenset({"tests"}),
    "deploy": frozenset({"tests"}),
}
"""Top-level packages each package may not import (the floors above it, and the tests)."""


@dataclass(frozen=True)
class Import:
    """One import statement of ``source`` naming module ``target`` (dotted, resolved), at file:line."""

    source: str
    target: str
    where: str


def module_files(root: Path, packages: dict[str, str]) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under the package folders (``pkg/__init__.py`` is ``pkg``)."""
    modules = {}
    for folder, name in packages.items():
        for path in sorted((root / folder).rglob("*.py")):
            parts = path.relative_to(root / folder).with_suffix("").parts
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            modules[".".join([name, *parts])] = path
    return modules


def floor(module: str) -> str:
    """The folder a module lies in: ``supermerge.flows.cli`` -> ``flows``, ``bench.report`` -> ``bench``."""
    parts = module.split(".")
    return parts[1] if parts[0] == "supermerge" and len(parts) > 1 else parts[0]


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module a ``from ... import`` names (``from . import x`` inside a.b is a)."""
    if node.level == 0:
        return node.module or ""
    package = module.split(".") if is_package else module.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def imports_of(module: str, path: Path, known: set[str], root: Path) -> list[Import]:
    """Every import in ``path`` (at any depth) of a known module or of ``tests``: for ``from p import n``
    the target is ``p.n`` when that is a module, else ``p``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, is_package, node)
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        where = f"{path.relative_to(root)}:{node.lineno}"
        for name in dict.fromkeys(names):
            target = _known_prefix(name, known)
            if target is None and name.split(".")[0] == "tests":
                target = name
            if target is not None and target != module:
                found.append(Import(module, target, where))
    return found


def _known_prefix(name: str, known: set[str]) -> str | None:
    """The longest known module ``name`` is or lies in (``a.b.f`` -> ``a.b`` when f is a function)."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in known:
            return ".".join(parts[:n])
    return None


def import_graph(root: Path, packages: dict[str, str]) -> list[Import]:
    modules = module_files(root, packages)
    known = set(modules)
    return [i for m, p in modules.items() for i in imports_of(m, p, known, root)]


def upward_imports(edges: list[Import], forbidden: dict[str, frozenset[str]]) -> list[str]:
    return [f"{e.where}: {e.source} imports {e.target} ({floor(e.source)} may not import {floor(e.target)})"
            for e in edges if floor(e.target) in forbidden.get(floor(e.source), ())]


def import_circles(edges: list[Import]) -> list[str]:
    """One circle per strongly connected group of modules, each arrow with its file:line, then the
    group's other members (each lies on some circle through the shown one's modules)."""
    graph = nx.DiGraph()
    for e in edges:
        if not graph.has_edge(e.source, e.target):
            graph.add_edge(e.source, e.target, where=e.where)
    circles = []
    for group in nx.strongly_connected_components(graph):
        if len(group) < 2:
            continue
        cycle = nx.find_cycle(graph.subgraph(group))
        shown = " -> ".join(f"{a} ({graph.edges[a, b]['where']})" for a, b in cycle) + f" -> {cycle[0][0]}"
        others = sorted(group - {a for a, _ in cycle})
        circles.append(shown + (f"; also in this circle: {', '.join(others)}" if others else ""))
    return sorted(circles)


def test_no_module_imports_a_floor_above_it_or_the_tests():
    problems = upward_imports(import_graph(ROOT, PACKAGES), FORBIDDEN)
    assert not problems, "upward imports (move the code down a floor, or the caller up):\n" + "\n".join(problems)


def test_no_import_circle():
    circles = import_circles(import_graph(ROOT, PACKAGES))
    assert not circles, "import circles (move what both sides need below both):\n" + "\n".join(circles)


def test_the_walker_sees_the_project_imports():
    """Guards the two tests above against passing on an empty graph."""
    edges = {(e.source, e.target) for e in import_graph(ROOT, PACKAGES)}
    assert ("supermerge.flows.hierarchical", "supermerge.orchestrator.node") in edges
    assert ("supermerge.orchestrator.plan", "supermerge.merge_core.config") in edges
    assert any(s.startswith("bench.") and t.startswith("supermerge.merge_core.") for s, t in edges)


def test_nothing_imports_the_folders_by_their_bare_names():
    """The product's modules import as supermerge.*; a bare ``merge_core.x`` (it resolves when the
    repository root is on sys.path) would load a second copy of the module, with its own classes."""
    bare = []
    for folder in ("merge_core", "orchestrator", "flows", "bench", "deploy", "tests"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                         else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
                bare += [f"{path.relative_to(ROOT)}:{node.lineno}: {n}" for n in names
                         if n.split(".")[0] in ("merge_core", "orchestrator", "flows")]
    assert not bare, "import these as supermerge.<folder>...:\n" + "\n".join(bare)


def test_the_walker_resolves_relative_and_lazy_imports_and_finds_circles_and_upward_arrows(tmp_path):
    files = {
        "low/__init__.py": "from . import a\n",
        "low/a.py": "def f():\n    from high.b import g\n",
        "low/sub/__init__.py": "",
        "low/sub/c.py": "from ..a import f\nfrom .. import a\nimport tests.tiny\n",
        "high/__init__.py": "",
        "high/b.py": "import low.sub.c\nfrom low import a\ndef g(): ...\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    edges = import_graph(tmp_path, {"low": "low", "high": "high"})
    assert {(e.source, e.target, e.where) for e in edges} == {
        ("low", "low.a", "low/__init__.py:1"),
        ("low.a", "high.b", "low/a.py:2"),
        ("low.sub.c", "low.a", "low/sub/c.py:1"),
        ("low.sub.c", "low.a", "low/sub/c.py:2"),
        ("low.sub.c", "tests.tiny", "low/sub/c.py:3"),
        ("high.b", "low.sub.c", "high/b.py:1"),
        ("high.b", "low.a", "high/b.py:2"),
    }
    assert upward_imports(edges, {"low": frozenset({"high", "tests"})}) == [
        "low/a.py:2: low.a imports high.b (low may not import high)",
        "low/sub/c.py:3: low.sub.c imports tests.tiny (low may not import tests)",
    ]
    (circle,) = import_circles(edges)
    assert "low.a (low/a.py:2)" in circle and "high.b (high/b.py:" in circle
