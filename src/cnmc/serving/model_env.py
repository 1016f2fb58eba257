"""What a logged model carries: only the project code that inference runs, and only the packages
that code imports, found by following the imports from :mod:`cnmc.serving.pyfunc`.

Bundling the whole package would ship the demo cells (20 MiB), test helpers and caches with every
model, and pinning the whole project's requirements would make a serving environment install DVC,
Optuna and captum for nothing.
"""

from __future__ import annotations

import shutil
import sys
from importlib.metadata import packages_distributions, requires
from pathlib import Path

from cnmc.core.imports import PACKAGE_DIR, code_closure

ENTRY = "cnmc.serving.pyfunc"


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
    distributions_of = packages_distributions()  # scans every installed package: once, not per import
    dists = {d.lower() for name in external - set(sys.stdlib_module_names) for d in distributions_of.get(name, [])}
    declared = [r for r in (requires("cnmc") or []) if "extra ==" not in r]
    return [r for r in declared if _name(r) in dists]


def _name(requirement: str) -> str:
    for stop in "<>=!~; [":
        requirement = requirement.split(stop, 1)[0]
    return requirement.strip().lower().replace("_", "-")
