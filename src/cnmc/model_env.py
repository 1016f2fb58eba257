"""What a logged model carries: only the project code that inference runs, and only the packages
that code imports, found by following the imports from :mod:`cnmc.serving`.

Bundling the whole package would ship the demo cells (20 MiB), test helpers and caches with every
model, and pinning the whole project's requirements would make a serving environment install DVC,
Optuna and captum for nothing.
"""

from __future__ import annotations

import ast
import shutil
import sys
from importlib.metadata import packages_distributions, requires
from pathlib import Path

import cnmc

PACKAGE_DIR = Path(cnmc.__file__).parent
ENTRY = "cnmc.serving"


def module_file(module: str) -> Path:
    """The source file of a ``cnmc`` module (a package's ``__init__.py``)."""
    path = PACKAGE_DIR.joinpath(*module.split(".")[1:])
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports by absolute name, at any depth (imports inside functions too)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def code_closure(entry: str = ENTRY) -> tuple[list[Path], set[str]]:
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
        for name in _imports(module_file(module)):
            if name.split(".")[0] != "cnmc":
                external.add(name.split(".")[0])
            elif module_file(name).is_file():  # ``from cnmc.x import y`` where y is not a module
                todo.append(name)
    return sorted(module_file(m) for m in seen), external


def copy_code(destination: Path, entry: str = ENTRY) -> Path:
    """Copy the closure into ``destination/cnmc`` (the layout ``code_paths`` wants); return it."""
    files, _ = code_closure(entry)
    root = destination / "cnmc"
    for path in files:
        target = root / path.relative_to(PACKAGE_DIR)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    return root


def requirements(entry: str = ENTRY) -> list[str]:
    """The project's pinned requirements of the distributions that the closure imports."""
    _, external = code_closure(entry)
    dists = {d.lower() for name in external - set(sys.stdlib_module_names)
             for d in packages_distributions().get(name, [])}
    declared = [r for r in (requires("cnmc") or []) if "extra ==" not in r]
    return [r for r in declared if _name(r) in dists]


def _name(requirement: str) -> str:
    for stop in "<>=!~; [":
        requirement = requirement.split(stop, 1)[0]
    return requirement.strip().lower().replace("_", "-")
