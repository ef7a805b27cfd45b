"""The layer rules of ARCHITECTURE.md, checked on the source: an AST walk over verge/.

Why a test rather than a document alone: an import that breaks a layer is one line in a
large change and easy to miss in review. Every import is counted wherever it is written
(module level, inside a function, under ``if TYPE_CHECKING``): a deferred import is still a
dependency. Each contract is one parametrised case, so a failure names the rule and the
offending ``file:line``. Adding a rule: add a :class:`Contract` and a line to
ARCHITECTURE.md.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "verge"

# Wiring: parts that start and connect the others (they own no logic of a layer).
WIRING = (
    "verge.cli",  # the package: verge.cli.edge, verge.cli.common, ...
    "verge.up",
    "verge.demo",
)


@dataclass(frozen=True, slots=True)
class Import:
    importer: str  # dotted module that holds the import statement
    imported: str  # dotted module (or package) it names, resolved
    where: str  # path:line, for the failure message

    @property
    def is_ours(self) -> bool:
        return self.imported == "verge" or self.imported.startswith("verge.")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve_from(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


@cache
def all_imports() -> tuple[Import, ...]:
    """Every import statement under verge/, with ``from pkg import submodule`` resolved."""
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {_module_name(p) for p in paths}
    found: list[Import] = []
    for path in paths:
        module = _module_name(path)
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve_from(node, module, path.name == "__init__.py")
                names = [
                    f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                    for a in node.names
                ]
            else:
                continue
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            found.extend(Import(module, name, where) for name in names)
    return tuple(found)


def within(module: str, prefixes: tuple[str, ...]) -> bool:
    """True when ``module`` is one of ``prefixes`` or inside one of them."""
    return any(module == p or module.startswith(p + ".") for p in prefixes)


@dataclass(frozen=True, slots=True)
class Contract:
    """Modules under ``importers`` must not import what ``allowed`` refuses."""

    name: str
    importers: tuple[str, ...]
    forbidden: tuple[str, ...] = ()  # never imported (prefixes)
    only: tuple[str, ...] | None = None  # of ours, nothing but these (None: no such limit)
    stdlib_only: bool = False  # no third-party package either
    exempt: tuple[str, ...] = ()  # importers the rule does not cover

    def breaks(self, imp: Import) -> bool:
        if not within(imp.importer, self.importers) or within(imp.importer, self.exempt):
            return False
        if imp.is_ours:
            if within(imp.imported, self.importers) and self.only is not None:
                return False  # a package's own modules
            if within(imp.imported, self.forbidden):
                return True
            return self.only is not None and not within(imp.imported, self.only)
        top = imp.imported.split(".")[0]
        return self.stdlib_only and top not in sys.stdlib_module_names and top != "__future__"


LAYERS = (
    "verge.cache",
    "verge.compute",
    "verge.control",
    "verge.edge",
    "verge.http",
    "verge.observe",
    "verge.protect",
    "verge.routing",
    "verge.stream",
)

CONTRACTS = (
    Contract(
        "http_semantics is standard library only",
        ("verge.http_semantics",),
        only=(),
        stdlib_only=True,
    ),
    Contract(
        "cache.policy is pure: standard library and http_semantics only",
        ("verge.cache.policy",),
        only=("verge.http_semantics",),
        stdlib_only=True,
    ),
    Contract(
        "cache imports no edge, http or other layer above it",
        ("verge.cache",),
        forbidden=tuple(p for p in LAYERS if p != "verge.cache"),
    ),
    Contract(
        "http imports no cache, edge, control, stream, compute or routing",
        ("verge.http",),
        forbidden=(
            "verge.cache",
            "verge.edge",
            "verge.control",
            "verge.stream",
            "verge.compute",
            "verge.routing",
            "verge.health",
            *WIRING,
        ),
    ),
    Contract(
        "control imports no edge, stream or routing",
        ("verge.control",),
        forbidden=("verge.edge", "verge.stream", "verge.routing", *WIRING),
    ),
    Contract(
        "routing imports no edge, stream, compute or cache",
        ("verge.routing",),
        forbidden=("verge.edge", "verge.stream", "verge.compute", "verge.cache", *WIRING),
    ),
    Contract(
        "stream imports no edge, control, routing, compute or cache",
        ("verge.stream",),
        forbidden=(
            "verge.edge",
            "verge.control",
            "verge.routing",
            "verge.compute",
            "verge.cache",
            *WIRING,
        ),
    ),
    Contract(
        "compute imports no control, edge, routing or stream",
        ("verge.compute",),
        forbidden=("verge.control", "verge.edge", "verge.routing", "verge.stream", *WIRING),
    ),
    Contract(
        "protect imports no edge, control, routing, stream, compute or cache",
        ("verge.protect",),
        forbidden=(
            "verge.edge",
            "verge.control",
            "verge.routing",
            "verge.stream",
            "verge.compute",
            "verge.cache",
            *WIRING,
        ),
    ),
    Contract(
        "edge reaches the control plane only through control.client",
        ("verge.edge",),
        forbidden=("verge.stream", *WIRING),
        only=(
            "verge.cache",
            "verge.cidr",
            "verge.compute",
            "verge.config",
            "verge.control.client",
            "verge.files",
            "verge.http",
            "verge.http_semantics",
            "verge.observe",
            "verge.procs",
            "verge.protect",
            "verge.routing.hashing",
            "verge.uri",
        ),
    ),
    Contract(
        "routing reaches the control plane only through control.client",
        ("verge.routing",),
        only=(
            "verge.config",
            "verge.control.client",
            "verge.health",
            "verge.http",
            "verge.http_semantics",
            "verge.uri",
        ),
    ),
    Contract("control.client imports nothing of ours", ("verge.control.client",), only=()),
    Contract(
        "health (shared by control and routing) imports nothing of ours", ("verge.health",), only=()
    ),
    Contract("compat is leaf adapters: nothing of ours but compat", ("verge.compat",), only=()),
    Contract("observe is a leaf: nothing of ours but observe", ("verge.observe",), only=()),
    Contract("cidr (IP sets for http and protect) imports nothing of ours", ("verge.cidr",),
             only=()),
    Contract("units (size and duration syntax) imports nothing of ours", ("verge.units",),
             only=()),
    Contract(
        "config imports nothing of ours but protect.settings and the units syntax",
        ("verge.config",),
        only=("verge.protect.settings", "verge.units"),
    ),
    Contract(
        "only wiring (cli*, up, demo) imports wiring", ("verge",), forbidden=WIRING, exempt=WIRING
    ),
)


def violations(contract: Contract) -> list[str]:
    return [
        f"{imp.where}: {imp.importer} imports {imp.imported}"
        for imp in all_imports()
        if contract.breaks(imp)
    ]


@pytest.mark.parametrize("contract", CONTRACTS, ids=[c.name for c in CONTRACTS])
def test_contract(contract: Contract) -> None:
    assert violations(contract) == [], contract.name


# Import edges (importer, imported module or package) that close a cycle between top-level
# parts today. Each is a debt with its fix; remove the line once the fix lands (a test below
# insists on it).
KNOWN_CYCLE_EDGES: set[tuple[str, str]] = set()


def part(module: str) -> str:
    """The top-level part a module belongs to: verge.edge.app -> edge, verge.uri -> uri."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def is_known(imp: Import, edges: set[tuple[str, str]]) -> bool:
    return any(
        imp.importer == source and within(imp.imported, (target,)) for source, target in edges
    )


def part_graph(skip: set[tuple[str, str]]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for imp in all_imports():
        if not imp.is_ours or is_known(imp, skip):
            continue
        source, target = part(imp.importer), part(imp.imported)
        if source != target and target != "verge":
            graph.setdefault(source, set()).add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path [a, b, ..., a], or None when it is acyclic."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_no_import_cycle_between_top_level_parts() -> None:
    cycle = find_cycle(part_graph(skip=KNOWN_CYCLE_EDGES))
    assert cycle is None, " -> ".join(cycle or [])


@pytest.mark.parametrize("edge", sorted(KNOWN_CYCLE_EDGES), ids=lambda e: f"{e[0]}->{e[1]}")
def test_known_cycle_edge_still_exists(edge: tuple[str, str]) -> None:
    """A debt that was paid must leave KNOWN_CYCLE_EDGES (and ARCHITECTURE.md)."""
    assert any(is_known(imp, {edge}) for imp in all_imports())


def test_the_walk_sees_imports() -> None:
    """Guards the guard: the scan resolves relative and ``from verge import x`` imports."""
    pairs = {(i.importer, i.imported) for i in all_imports()}
    assert ("verge.cache.keys", "verge.uri") in pairs
    assert ("verge.routing.router", "verge.control.client") in pairs
    assert find_cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
