"""Which project source files a module needs: its ``cnmc`` imports, followed to the end.

The served model bundles the closure of :mod:`cnmc.serving.pyfunc` (:mod:`cnmc.serving.model_env`), and each
DVC stage depends on the closure of its entry module (:mod:`cnmc.jobs.stages`), so that a change to a
file reruns exactly the stages whose code runs it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import cnmc

PACKAGE_DIR = Path(cnmc.__file__).parent


def module_file(module: str) -> Path:
    """The source file of a ``cnmc`` module (a package's ``__init__.py``)."""
    path = PACKAGE_DIR.joinpath(*module.split(".")[1:])
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def parsed(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports by absolute name, at any depth (imports inside functions too),
    but those under ``if TYPE_CHECKING:``, which never run."""
    names: set[str] = set()
    for node in _runtime_nodes(parsed(path)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """``ast.walk`` of ``tree`` without the bodies of ``if TYPE_CHECKING:`` blocks."""
    found, todo = [], [tree]
    while todo:
        node = todo.pop()
        found.append(node)
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def code_closure(entry: str) -> tuple[list[Path], set[str]]:
    """The ``cnmc`` source files ``entry`` needs (with their packages' ``__init__``), and the
    top-level names of the other modules they import."""
    todo, seen, external = [entry], set(), set()
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        parts = module.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # parent packages run first
        for name in imported_modules(module_file(module)):
            if name.split(".")[0] != "cnmc":
                external.add(name.split(".")[0])
            elif module_file(name).is_file():  # ``from cnmc.x import y`` where y is not a module
                todo.append(name)
    return sorted(module_file(m) for m in seen), external
