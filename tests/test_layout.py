"""The package's floors hold: no import cycle, and no module imports a floor above its own.

Every module under oftsurgery/ is parsed with `ast` (nothing is imported), and every import it
names, at module level, under `if TYPE_CHECKING`, or inside a function, becomes an edge of the
module graph (`from a.b import c` points at the module a.b.c when there is one, else at a.b).
Importing a package does not add an edge to its own __init__ here: Python runs a package's
__init__ before its submodules, but that is not a dependency the submodule chose.
The floors are `LAYERS`, lowest first; docs/architecture.md draws them.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "oftsurgery"

# Lowest floor first. A module may import its own group and any group on a lower floor; groups that
# share a floor may not import each other. A group is a module and everything below it, except the
# root "oftsurgery", which is oftsurgery/__init__.py alone. A new module must fall into a group.
LAYERS: list[list[str]] = [
    ["oftsurgery", "oftsurgery.errors", "oftsurgery.schema", "oftsurgery.texts"],
    ["oftsurgery._deps", "oftsurgery.device"],
    ["oftsurgery.quant", "oftsurgery.io"],
    ["oftsurgery.oft"],
    ["oftsurgery.reporting"],  # below merge: the merge writes the card, provenance and serving kernels
    ["oftsurgery.merge.options", "oftsurgery.merge.plan", "oftsurgery.merge.report"],  # the merge's vocabulary
    ["oftsurgery.merge.solve", "oftsurgery.merge.runtime"],  # one linear's math; threads, streams, ranks
    ["oftsurgery.merge.calibration"],  # what the linears see
    # one linear's choice; its residual LoRA; a decoder layer's tuning after the solve
    ["oftsurgery.merge.candidates", "oftsurgery.merge.residual_adapter", "oftsurgery.merge.layer_tuning"],
    ["oftsurgery.merge.merger"],  # stored weights in, packed tensors out
    ["oftsurgery.merge.calibrated_loop"],  # the calibrated decoder-layer loop
    ["oftsurgery.merge.engine"],  # merge_checkpoint
    ["oftsurgery.merge"],  # the face (merge/__init__.py)
    ["oftsurgery.evaluation"],
    ["oftsurgery.attach", "oftsurgery.extract", "oftsurgery.inspect", "oftsurgery.verify", "oftsurgery.push"],
    ["oftsurgery.testing"],  # fixtures: nothing below may import them
    ["oftsurgery.demo"],
    ["oftsurgery.cli"],
    ["oftsurgery.__main__"],
]
TOP_LEVEL_MODULES = 12
MERGE_MODULE_LINES = 500


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


MODULES = _modules()


def _imports(name: str, path: Path) -> list[tuple[str, bool]]:
    """(imported module, at module level?) for every import statement of one module."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[tuple[str, bool]] = []

    def target(dotted: str) -> str | None:
        while dotted and dotted not in MODULES:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((t, inner) for a in child.names if (t := target(a.name)))
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                for alias in child.names:
                    sub = f"{base}.{alias.name}"
                    t = sub if sub in MODULES else target(base)
                    if t:
                        found.append((t, inner))
            visit(child, inner)

    visit(tree, True)
    return [(t, top) for t, top in found if t.startswith("oftsurgery") and t != name]


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _group(module: str) -> tuple[int, str] | None:
    best: tuple[int, str] | None = None
    for floor, groups in enumerate(LAYERS):
        for group in groups:
            matches = module == group or (group != "oftsurgery" and module.startswith(group + "."))
            if matches and (best is None or len(group) > len(best[1])):
                best = (floor, group)
    return best


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph, as the modules along it, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := walk(nxt)):
                return found
        state[node] = 2
        path.pop()
        return None

    for node in sorted(edges):
        if node not in state and (found := walk(node)):
            return found
    return None


def test_the_graph_is_read():
    """The parser sees the imports that matter (a broken parser would pass every check below)."""
    assert ("oftsurgery.merge.engine", True) in GRAPH["oftsurgery.merge"]
    assert ("oftsurgery.merge.solve.requant", False) in GRAPH["oftsurgery.merge.candidates"]
    assert ("oftsurgery.merge.runtime.ranks", True) in GRAPH["oftsurgery.merge.calibration.statistics"]  # TYPE_CHECKING
    assert ("oftsurgery.reporting.card", False) in GRAPH["oftsurgery.push"]


@pytest.mark.parametrize("level", ["module level", "module and function level"])
def test_no_import_cycle(level):
    edges = {m: {t for t, top in targets if top or level != "module level"} for m, targets in GRAPH.items()}
    cycle = _cycle(edges)
    assert cycle is None, f"import cycle ({level}): {' -> '.join(cycle)}"


def test_every_module_has_a_floor():
    missing = sorted(m for m in MODULES if _group(m) is None)
    assert not missing, f"add these modules to a group of LAYERS in tests/test_layout.py: {missing}"


def test_no_module_imports_a_floor_above_its_own():
    wrong = []
    for module, targets in GRAPH.items():
        floor, group = _group(module)
        for target, _ in targets:
            target_floor, target_group = _group(target)
            if target_group != group and target_floor >= floor:
                wrong.append(f"{module} (floor {floor}, {group}) imports {target} (floor {target_floor}, {target_group})")
    assert not wrong, "imports against the floors of LAYERS:\n" + "\n".join(sorted(set(wrong)))


def test_the_layers_name_only_modules_that_exist():
    assert not [g for groups in LAYERS for g in groups if g not in MODULES]


def test_the_top_level_shows_few_modules():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= TOP_LEVEL_MODULES, top


def test_no_merge_module_is_long():
    long = {str(p.relative_to(PACKAGE)): n for p in (PACKAGE / "merge").rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MERGE_MODULE_LINES}
    assert not long, long
