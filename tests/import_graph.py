"""kvc_compile's internal import graph, read from the source (no imports run): its cycles and
the imports that go against the package layers. ``python tests/import_graph.py`` prints both.

Every ``import`` counts, at module level or inside a function (a lazy import is still a
dependency), except those under ``if TYPE_CHECKING:``. Importing a submodule is counted as a
dependency on that submodule, not on its parent packages.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterable
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "kvc_compile"

# Lowest first: a module may import its own layer and the layers below, never one above.
LAYERS: list[tuple[str, ...]] = [
    ("kvc_compile.files", "kvc_compile.inputs", "kvc_compile.transformers_compat", "kvc_compile.version",
     "kvc_compile.models"),
    ("kvc_compile.methods",),  # scorers, selection, rotary maths
    ("kvc_compile.compression",),  # layouts, site compression, eviction, low rank: pure tensors
    ("kvc_compile.plugins", "kvc_compile.plugins.triton"),  # kernels
    ("kvc_compile.config",),
    ("kvc_compile.ops",),  # torch.library registrations
    ("kvc_compile.cache",),
    ("kvc_compile.passes",),
    ("kvc_compile.backend", "kvc_compile.reference", "kvc_compile.lookahead"),
    ("kvc_compile.plugins.onnx", "kvc_compile.plugins.tensorrt"),  # export targets
    ("kvc_compile.engine",),
    ("kvc_compile.eval", "kvc_compile.bench"),
    ("kvc_compile.cli",),
    ("kvc_compile",),  # the package's public names
]


def module_files(package: Path = PACKAGE) -> dict[str, Path]:
    """{dotted module name: file} for every module of the package."""
    modules = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(sub) for sub in ast.walk(node))
    return skipped


def imported_modules(module: str, path: Path, known: Iterable[str]) -> set[str]:
    """The package's modules that ``module`` imports."""
    known = set(known)

    def resolve(name: str) -> str | None:
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name or None

    tree = ast.parse(path.read_text(), filename=str(path))
    skipped = _type_checking_nodes(tree)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            # ``from package import submodule`` depends on the submodule; ``from module import name`` on the module.
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for name in names:
            if name == "kvc_compile" or name.startswith("kvc_compile."):
                target = resolve(name)
                if target is not None and target != module:
                    found.add(target)
    return found


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    modules = module_files(package)
    return {module: imported_modules(module, path, modules) for module, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    previous = sys.getrecursionlimit()
    sys.setrecursionlimit(max(previous, 10 * len(graph) + 100))
    try:
        for node in sorted(graph):
            if node not in index:
                visit(node)
    finally:
        sys.setrecursionlimit(previous)
    return sorted(found)


def layer_of(module: str, layers: list[tuple[str, ...]] = LAYERS) -> int:
    """The layer of the longest prefix in ``layers`` naming ``module`` or a package above it."""
    best, best_length = None, -1
    for rank, prefixes in enumerate(layers):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_length:
                best, best_length = rank, len(prefix)
    if best is None:
        raise ValueError(f"{module} is in no layer of tests/import_graph.py's LAYERS; add it where it belongs")
    return best


def upward_imports(graph: dict[str, set[str]], layers: list[tuple[str, ...]] = LAYERS) -> list[tuple[str, str]]:
    """(importer, imported) pairs where a module imports from a layer above its own."""
    return sorted((source, target) for source, targets in graph.items() for target in targets
                  if layer_of(target, layers) > layer_of(source, layers))


if __name__ == "__main__":
    graph = import_graph()
    found_cycles, upward = cycles(graph), upward_imports(graph)
    print(f"{len(graph)} modules, {sum(map(len, graph.values()))} imports between them")
    print(f"{len(found_cycles)} cycles" + "".join(f"\n  {len(c)} modules: {' '.join(c)}" for c in found_cycles))
    print(f"{len(upward)} imports against the layers" + "".join(f"\n  {a} -> {b}" for a, b in upward))
