"""The import rule of docs/architecture.md: layers only look down, and no module cycles.

Every ``import`` of ``src/unseg`` (function-level ones too) is read with :mod:`ast`; each module
belongs to the layer of its package (or top-level module) in :data:`LAYERS`. An import of a
higher layer fails, and so does any cycle among modules.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"

# bottom to top; a module may import its own layer and those below it
LAYERS: list[tuple[str, ...]] = [
    ("unseg._version", "unseg.errors", "unseg.layout", "unseg.utils"),
    ("unseg.data", "unseg.backbones", "unseg.metrics", "unseg.outdir"),
    ("unseg.feature_store", "unseg.features"),
    ("unseg.refine",),
    ("unseg.proposals",),
    ("unseg.registry",),
    ("unseg.methods",),
    ("unseg.runs",),
    ("unseg.pipelines",),  # the stages and the kinds the Segmenter and the folders share
    # folders and memory, side by side
    ("unseg.pipelines.folder", "unseg.segmenter_params", "unseg.segmenter"),
    ("unseg.report",),
    ("unseg.cli",),
    ("unseg",),  # the package's front door: lazy attributes only
]


def _modules() -> dict[str, Path]:
    out = {}
    for path in (SRC / "unseg").rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _imports(path: Path) -> set[str]:
    """The unseg modules ``path`` imports (``from pkg import sub`` counts as ``pkg.sub``)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "unseg"}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and (
            node.module.split(".")[0] == "unseg"
        ):
            subs = {f"{node.module}.{a.name}" for a in node.names} & set(MODULES)
            found |= subs or {node.module}
            if subs and len(subs) < len(node.names):
                found.add(node.module)
    return found


def layer(module: str) -> int:
    """The index in :data:`LAYERS` of the longest entry that is ``module`` or a parent of it."""
    best, index = -1, -1
    for i, names in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and len(name) > best:
                best, index = len(name), i
    if index < 0:
        raise AssertionError(f"{module} is in no layer of tests/unit/test_import_graph.py")
    return index


GRAPH = {m: _imports(p) & set(MODULES) for m, p in MODULES.items()}


def test_every_module_has_a_layer() -> None:
    for module in MODULES:
        layer(module)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_imports_a_higher_layer(module: str) -> None:
    up = sorted(i for i in GRAPH[module] if layer(i) > layer(module))
    assert not up, f"{module} (layer {layer(module)}) imports higher layers: {up}"


def test_no_import_cycles() -> None:
    """Depth-first search for a back edge; the message names the cycle."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(GRAPH[m]):
            if state.get(n) == 1:
                cycle = [*stack[stack.index(n):], n]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m)


def test_the_checker_sees_a_violation(tmp_path: Path) -> None:
    """The parser finds function-level imports and ``from pkg import sub`` (a check that sees
    nothing would pass every test above)."""
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from unseg.pipelines import semantic\n    import unseg.cli\n")
    assert _imports(source) == {"unseg.pipelines.semantic", "unseg.cli"}
    assert layer("unseg.pipelines.semantic") > layer("unseg.methods.kmeans")
