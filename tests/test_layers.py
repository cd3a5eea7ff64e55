"""The package's structure: layers import only downwards, no import cycle, no private
cross-imports, small modules, few top-level modules.

Every ``import`` statement counts, wherever it stands: at the top of a module, inside a
function, under ``TYPE_CHECKING``. The graph is read from the source with ``ast`` (nothing is
imported), so the test sees exactly what a reader of the code sees.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "specs_metric"

# Bottom to top. A module may import modules of its own layer or of layers below it.
LAYERS: list[tuple[str, ...]] = [
    ("errors", "limits"),
    ("io",),
    ("runtime",),
    ("data",),
    ("processing",),
    ("synth",),
    ("models",),
    ("scoring",),
    ("jobs",),
    ("training",),
    ("evaluation",),
    ("demo",),
    ("integrations",),
    ("cli", "__main__"),
]
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}
MAX_TOP_LEVEL_MODULES = 8
MAX_MODULE_LINES = 500


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _target(module: str, node: ast.ImportFrom | ast.Import) -> list[tuple[str, str | None]]:
    """``(imported module, imported name or None)`` of an import statement, package-internal
    only (the longest prefix that is a module of the package)."""
    found: list[tuple[str, str | None]] = []
    if isinstance(node, ast.Import):
        candidates = [(alias.name, None) for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            here = module.split(".")
            if not str(MODULES[module]).endswith("__init__.py"):
                here = here[:-1]
            here = here[: len(here) - (node.level - 1)]
            base = ".".join(here + ([base] if base else []))
        candidates = []
        for alias in node.names:
            full = f"{base}.{alias.name}"
            candidates.append((full, None) if full in MODULES else (base, alias.name))
    for name, imported in candidates:
        if name.split(".")[0] != "specs_metric":
            continue
        while name not in MODULES and "." in name:
            name = name.rsplit(".", 1)[0]
        found.append((name, imported))
    return found


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target, _ in _target(module, node):
                    if target != module:
                        graph[module].add(target)
    return graph


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None  # None: the package's own __init__


def test_every_subpackage_and_top_level_module_has_a_layer():
    layers = {_layer(m) for m in MODULES} - {None}
    assert layers <= set(RANK), f"modules outside every layer: {sorted(layers - set(RANK))}"


def test_imports_go_only_downwards():
    wrong = []
    for module, targets in _graph().items():
        here = _layer(module)
        for target in targets:
            there = _layer(target)
            if here is None or there is None:
                continue  # the package __init__ (lazy public names) is no layer
            if RANK[there] > RANK[here]:
                wrong.append(f"{module} -> {target}")
    assert not wrong, "imports that go up a layer:\n" + "\n".join(sorted(wrong))


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle():
    assert _cycles(_graph()) == []


def test_the_cycle_finder_finds_cycles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def test_no_module_imports_another_modules_private_name():
    wrong = []
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.ImportFrom):
                continue
            for target, name in _target(module, node):
                if name is not None and _private(name) and target != module:
                    wrong.append(f"{module} imports {target}.{name}")
    assert not wrong, "\n".join(wrong)


def test_few_top_level_modules():
    top = [p.name for p in PACKAGE.glob("*.py")]
    assert len(top) <= MAX_TOP_LEVEL_MODULES, sorted(top)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_module_size(module):
    lines = MODULES[module].read_text(encoding="utf-8").count("\n")
    assert lines <= MAX_MODULE_LINES, f"{module}: {lines} lines"
