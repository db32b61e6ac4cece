"""The layout is the architecture: every module's imports, read with ``ast`` (nothing is
imported), checked against the layers of ``docs/architecture.md`` §4.

Wings, lowest first (a module may import its own wing and any wing of a lower rank; wings
of the same rank never import each other):

====  ==========================================  ===========================================
rank  wing                                        what
====  ==========================================  ===========================================
0     ground: ``shared`` itself, ``errors``,       what every layer may use
      ``crypto``, ``pan``
1     ``shared.iso``, ``shared.resilience``,       the wire, pure policies, the databases
      ``shared.store``
2     ``shared.ops``                               settings, logs, metrics
3     ``shared.net``                               links (trio)
4     ``shared.server``                            the service skeleton
5-8   ``hsm`` < ``billing`` < ``gateway`` <         the services, in the order of the calls:
      ``acquirer``                                 a service may import those it calls
9     ``shared.lab``                               the lab bench: drives the services
10    ``shared.cli``                               the ``paylab`` command
11    ``loadtests``, ``deploy``                    tools
====  ==========================================  ===========================================

Which imports count:

* **the layer rule** holds for every import wherever it stands: at module level, inside a
  function (a lazy import is still a dependency) and under ``if TYPE_CHECKING:``;
* **no import circle** holds for the imports that run: module level and inside functions
  alike, so the project's modules form one acyclic graph. Only ``TYPE_CHECKING`` imports
  (never run) are left out of the circle check.

``tests/`` may import anything and is not checked.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: Top-level folders whose Python files are the project's modules.
SOURCE_ROOTS = ("acquirer", "billing", "gateway", "hsm", "shared", "loadtests", "deploy")

#: The ground modules: what every layer may use.
GROUND = frozenset({"shared", "shared.errors", "shared.crypto", "shared.pan"})

#: Wing -> rank; a module belongs to the wing that is the longest prefix of its name.
WINGS: dict[str, int] = {
    "shared.iso": 1,
    "shared.resilience": 1,
    "shared.store": 1,
    "shared.ops": 2,
    "shared.net": 3,
    "shared.server": 4,
    "hsm": 5,
    "billing": 6,
    "gateway": 7,
    "acquirer": 8,
    "shared.lab": 9,
    "shared.cli": 10,
    "loadtests": 11,
    "deploy": 11,
}

#: Names for the messages: the layer a rank belongs to.
LAYER_OF_RANK = {
    0: "ground",
    1: "library",
    2: "library",
    3: "library",
    4: "library",
    5: "services",
    6: "services",
    7: "services",
    8: "services",
    9: "lab",
    10: "cli",
    11: "tools",
}


@dataclass(frozen=True)
class Import:
    """One import of a project module by another."""

    source: str
    target: str
    line: int
    #: "module" (runs at import), "function" (runs when called), "typing" (never runs).
    kind: str


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def source_files() -> dict[str, Path]:
    files: dict[str, Path] = {}
    for root in SOURCE_ROOTS:
        for path in sorted((ROOT / root).rglob("*.py")):
            if ".venv" in path.parts or "__pycache__" in path.parts:
                continue
            files[module_name(path)] = path
    return files


MODULES = source_files()
PACKAGES = frozenset(name for name, path in MODULES.items() if path.name == "__init__.py")


def wing_of(module: str) -> str:
    if module in GROUND:
        return "ground"
    best = ""
    for wing in WINGS:
        if (module == wing or module.startswith(wing + ".")) and len(wing) > len(best):
            best = wing
    return best


def rank_of(module: str) -> int:
    wing = wing_of(module)
    return 0 if wing == "ground" else WINGS[wing]


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _resolve(module: str, node: ast.ImportFrom) -> str:
    """The absolute module an ``ImportFrom`` names (relative imports resolved)."""
    if not node.level:
        return node.module or ""
    package = module if module in PACKAGES else module.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


def _targets(module: str, node: ast.Import | ast.ImportFrom) -> Iterator[str]:
    """Project modules an import statement loads (with the packages above them)."""
    names: list[str] = []
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = _resolve(module, node)
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            names.append(sub if sub in MODULES else base)
    for name in names:
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            prefix = ".".join(parts[:i])
            if prefix in MODULES and prefix != module:
                yield prefix


def imports_of(module: str, path: Path) -> list[Import]:
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    found: list[Import] = []

    def visit(node: ast.AST, kind: str) -> None:
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.extend(
                Import(module, target, node.lineno, kind) for target in _targets(module, node)
            )
            return
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            inner = "typing" if kind == "typing" else "function"
            for child in ast.iter_child_nodes(node):
                visit(child, inner)
            return
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                visit(child, "typing")
            for child in node.orelse:
                visit(child, kind)
            return
        for child in ast.iter_child_nodes(node):
            visit(child, kind)

    visit(tree, "module")
    return found


IMPORTS = [imp for name, path in MODULES.items() for imp in imports_of(name, path)]


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), and modules
    that import themselves."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = 0

    def strongconnect(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                strongconnect(w)
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
            if len(component) > 1 or v in edges.get(v, ()):
                cycles.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            strongconnect(v)
    return cycles


# -- the checks --------------------------------------------------------------------------------
def test_the_scan_sees_the_project() -> None:
    """A guard for the test itself: the modules and imports it reads are the real ones."""
    assert {"shared.iso.codec", "shared.cli.app", "gateway.service", "hsm"} <= set(MODULES)
    assert Import("gateway.service", "hsm.client", 0, "module") in {
        Import(i.source, i.target, 0, i.kind) for i in IMPORTS
    }
    assert any(i.kind == "function" for i in IMPORTS)
    assert len(MODULES) > 100


@pytest.mark.parametrize("module", sorted(MODULES))
def test_every_module_is_in_a_wing(module: str) -> None:
    """A module at the top of ``shared/`` is ground only when listed as such; every other
    module lives in a wing."""
    assert wing_of(module), (
        f"{module} belongs to no wing: put it into one (docs/architecture.md §4) "
        "or, if every layer may use it, add it to GROUND in tests/test_layers.py"
    )


def upward(imports: list[Import]) -> list[str]:
    """The imports against the layers, one line each (duplicates merged)."""
    return sorted(
        {
            f"{i.source}:{i.line} ({wing_of(i.source)}, {LAYER_OF_RANK[rank_of(i.source)]}) "
            f"imports {wing_of(i.target)} ({LAYER_OF_RANK[rank_of(i.target)]})"
            + ("" if i.kind == "module" else f" [{i.kind}]")
            for i in imports
            if wing_of(i.source) != wing_of(i.target) and rank_of(i.target) >= rank_of(i.source)
        }
    )


def test_no_import_goes_up() -> None:
    found = upward(IMPORTS)
    assert not found, "imports against the layers:\n" + "\n".join(found)


@pytest.mark.parametrize(
    ("source", "target", "allowed"),
    [
        ("shared.cli.app", "shared.iso.codec", True),
        ("shared.lab.network", "gateway.service", True),
        ("gateway.service", "hsm.client", True),
        ("shared.iso.codec", "shared.errors", True),
        ("shared.net.tcp", "shared.store.group_commit", True),
        ("shared.iso.codec", "shared.ops.settings", False),
        ("shared.iso.codec", "shared.store.db", False),
        ("shared.errors", "shared.iso.codes", False),
        ("shared.server.service", "shared.lab.chaos.controller", False),
        ("gateway.service", "shared.cli.console", False),
        ("hsm.client", "gateway.service", False),
        ("shared.lab.demo", "shared.cli.console", False),
    ],
)
def test_the_layer_rule_judges_imports(source: str, target: str, allowed: bool) -> None:
    """A guard for the test itself: the rule, on made-up imports (lazy ones count too)."""
    assert (upward([Import(source, target, 1, "function")]) == []) is allowed


def test_services_never_import_the_lab_or_the_cli() -> None:
    """The rule above, spelled out for the services and the library (clearer failures)."""
    for i in IMPORTS:
        if rank_of(i.source) <= WINGS["acquirer"]:
            assert not i.target.startswith(("shared.lab", "shared.cli")), i
        if rank_of(i.source) < WINGS["hsm"]:
            assert wing_of(i.target) not in ("hsm", "billing", "gateway", "acquirer"), i


def test_no_import_circle() -> None:
    edges: dict[str, set[str]] = {}
    for i in IMPORTS:
        if i.kind != "typing":
            edges.setdefault(i.source, set()).add(i.target)
    cycles = find_cycles(edges)
    assert not cycles, "import circles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_the_cycle_finder_finds_cycles() -> None:
    """A guard for the test itself."""
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"a"}}) == [["a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []
