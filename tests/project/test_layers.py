"""The package layout is the architecture: each module imports only its own layer and those
below it, and nothing imports in a circle (lazy imports inside functions count too); and no
function is so long that it holds more than one choice."""

from __future__ import annotations

import ast
from pathlib import Path

from cnmc.core.imports import PACKAGE_DIR, imported_modules

# Bottom to top. A module may import its own layer and the layers below.
LAYERS = (
    ("core", {"cnmc", "cnmc.core", "cnmc.profiles"}),
    ("library", {"cnmc.data", "cnmc.models", "cnmc.inference", "cnmc.metrics", "cnmc.plots", "cnmc.training"}),
    ("tracking", {"cnmc.tracking"}),
    ("serving", {"cnmc.serving"}),
    ("jobs", {"cnmc.jobs"}),
    ("command line", {"cnmc.cli", "cnmc.__main__"}),  # cnmc.cli: the package, all its modules
)
MAX_FUNCTION_LINES = 120


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def package(module: str) -> str:
    return ".".join(module.split(".")[:2])


def layer(module: str) -> int:
    home = module if module in {"cnmc", "cnmc.__main__"} else package(module)  # cnmc.cli.data -> cnmc.cli
    return next(i for i, (_, members) in enumerate(LAYERS) if home in members)


def graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports (``from cnmc.x import name`` counts as ``cnmc.x``)."""
    mods = modules()
    edges = {}
    for name, path in mods.items():
        deps = {dep for dep in imported_modules(path) if dep in mods and dep != name}
        # ``from cnmc.pkg import module`` imports the module, not what the package's __init__ imports
        edges[name] = {dep for dep in deps if not any(other.startswith(dep + ".") for other in deps)}
    return edges


def cycle(edges: dict[str, set[str]]) -> list[str]:
    """One import cycle of ``edges``, or [] (depth-first search, colouring nodes)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        stack.pop()
        return []

    for node in sorted(edges):
        if node not in state and (found := visit(node)):
            return found
    return []


def test_every_module_has_a_layer() -> None:
    for name in modules():
        layer(name)  # StopIteration names a module nobody placed


def test_no_module_imports_a_layer_above_its_own() -> None:
    upward = [
        f"{name} ({LAYERS[layer(name)][0]}) imports {dep} ({LAYERS[layer(dep)][0]})"
        for name, deps in graph().items()
        for dep in deps
        if layer(dep) > layer(name)
    ]
    assert not upward, "\n".join(upward)


def test_no_import_cycle_between_modules_or_packages() -> None:
    edges = graph()
    assert not cycle(edges), " -> ".join(cycle(edges))
    packages: dict[str, set[str]] = {}
    for name, deps in edges.items():
        if name.count(".") >= 2:  # a package's modules; the package's own __init__ is its door
            packages.setdefault(package(name), set()).update(
                package(dep) for dep in deps if package(dep) != package(name) and dep.count(".") >= 1
            )
    assert not cycle(packages), " -> ".join(cycle(packages))


def test_no_function_is_longer_than_the_limit() -> None:
    """A function of more than MAX_FUNCTION_LINES lines (decorators aside) holds several choices: split it."""
    long = []
    for path in modules().values():
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno is not None:
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(PACKAGE_DIR.parents[1])}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(long)
