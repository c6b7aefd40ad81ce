"""The layers of docs/architecture.md, enforced from the import graph.

Every module of the package is parsed with ``ast`` and placed in a layer by its folder (or,
for the few modules at the top level, by its name). An import - at the top of a module or
inside a function, since a function-local import is still an arrow - may go to the same
layer or a lower one, never to a higher one; and the folders (and top-level modules) of one
layer must not import each other in a cycle. A new folder or top-level module must be given
a layer here (and a line in docs/architecture.md) before it can import anything.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import cloudckpt

PACKAGE = Path(cloudckpt.__file__).parent
ARCHITECTURE = PACKAGE.parent / "docs" / "architecture.md"

#: Lowest first. A unit is a folder under ``cloudckpt/`` or a top-level module; ``cloudckpt``
#: itself is the package's ``__init__`` (the public surface).
LAYERS: tuple[tuple[str, frozenset[str]], ...] = (
    ("base", frozenset({"errors", "options", "_testhooks"})),
    ("storage", frozenset({"storage"})),
    ("format", frozenset({"format"})),
    ("state", frozenset({"trackable", "adapters", "leaves", "object_graph", "coordination"})),
    ("saving/restoring", frozenset({"saving", "restoring"})),
    ("api", frozenset({"checkpoint", "manager", "distributed"})),
    # jax, orbax, lightning, hf: the framework doors (each imports its framework only inside itself).
    ("integrations", frozenset({"dcp", "tfbundle", "tools", "jax", "orbax", "lightning", "hf"})),
    ("surface", frozenset({"cli", "demo", "testing", "cloudckpt", "__main__"})),
)

#: Imports allowed to go up a layer, as ``(importing module, imported module): reason``. None today.
EXCEPTIONS: dict[tuple[str, str], str] = {}

_LAYER_OF = {unit: i for i, (_, units) in enumerate(LAYERS) for unit in units}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = ("cloudckpt", *path.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "cloudckpt"


def _imports(module: str, path: Path) -> set[str]:
    """The package's modules that ``module`` imports, anywhere in its body."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                # ``from cloudckpt import errors`` imports the module cloudckpt.errors.
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
    return {name for name in found if name == "cloudckpt" or name.startswith("cloudckpt.")}


GRAPH = {module: _imports(module, path) for module, path in MODULES.items()}


def test_every_unit_has_a_layer() -> None:
    missing = sorted({_unit(m) for m in MODULES} - set(_LAYER_OF))
    assert not missing, f"give these a layer in tests/test_architecture.py and docs/architecture.md: {missing}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_import_goes_to_a_higher_layer(module: str) -> None:
    own = _LAYER_OF[_unit(module)]
    upward = []
    for target in sorted(GRAPH[module]):
        layer = _LAYER_OF[_unit(target)]
        if layer > own and (module, target) not in EXCEPTIONS:
            upward.append(f"{target} ({LAYERS[layer][0]})")
    assert not upward, f"{module} ({LAYERS[own][0]}) imports a higher layer: {', '.join(upward)}"


def test_the_units_of_a_layer_do_not_import_each_other_in_a_cycle() -> None:
    edges: dict[str, set[str]] = {}
    for module, targets in GRAPH.items():
        for target in targets:
            if _unit(target) != _unit(module):
                edges.setdefault(_unit(module), set()).add(_unit(target))
    cycles = []

    def visit(unit: str, path: list[str]) -> None:
        for nxt in sorted(edges.get(unit, ())):
            if nxt in path:
                cycles.append([*path[path.index(nxt):], nxt])
            elif nxt not in done:
                visit(nxt, [*path, nxt])
        done.add(unit)

    done: set[str] = set()
    for unit in sorted(edges):
        if unit not in done:
            visit(unit, [unit])
    assert not cycles, f"import cycles between folders/modules: {cycles}"


def test_saving_and_restoring_do_not_import_each_other() -> None:
    crossing = sorted((module, target) for module, targets in GRAPH.items() for target in targets
                      if {_unit(module), _unit(target)} == {"saving", "restoring"})
    assert not crossing, f"saving/ and restoring/ are mirrors, neither imports the other: {crossing}"


def test_the_exceptions_are_still_needed() -> None:
    stale = [pair for pair in EXCEPTIONS if pair[1] not in GRAPH.get(pair[0], set())]
    assert not stale, f"remove these from EXCEPTIONS, the import is gone: {stale}"


def test_the_architecture_page_names_every_unit() -> None:
    page = ARCHITECTURE.read_text()
    units = sorted({_unit(m) for m in MODULES} - {"cloudckpt", "__main__"})
    named = [u for u in units if f"{u}/" in page or f"{u}.py" in page]
    assert named == units, f"docs/architecture.md does not name: {sorted(set(units) - set(named))}"


#: Where README.md and docs/ show code: an import of ``cloudckpt.X`` must name a public path.
_DOCS = [PACKAGE.parent / "README.md", *sorted((PACKAGE.parent / "docs").glob("*.md"))]


def _public_paths() -> set[str]:
    """The modules docs/architecture.md's "Public paths" paragraph names (plus the package itself)."""
    page = ARCHITECTURE.read_text()
    start = page.index("Public paths:")
    paragraph = page[start:page.index("\n\n", start)]
    return {"cloudckpt", "cloudckpt.errors", *re.findall(r"`(cloudckpt\.[a-z_.]+)`", paragraph)}


def test_the_public_paths_exist() -> None:
    missing = sorted(_public_paths() - MODULES.keys())
    assert not missing, f"docs/architecture.md names public paths that are no module: {missing}"


@pytest.mark.parametrize("doc", _DOCS, ids=lambda p: p.name)
def test_the_docs_import_only_public_paths(doc: Path) -> None:
    """The public surface is what the docs teach: an example that imports an internal module makes it public."""
    public = _public_paths()
    imported = re.findall(r"^\s*(?:from|import)\s+(cloudckpt(?:\.[a-z_0-9]+)*)", doc.read_text(), re.MULTILINE)
    internal = sorted({name for name in imported
                       if name != "cloudckpt" and not any(name == p or name.startswith(p + ".")
                                                          for p in public - {"cloudckpt"})})
    assert not internal, f"{doc.name} imports internal modules (use a public path, or make one public): {internal}"
