"""The demo data set: 523 real C-NMC 2019 cells shipped with the package, copied byte for byte.

``cnmc demo-data DIR`` (and so ``make demo``) copies ``cnmc/demo_cells/C-NMC_Leukemia`` into
``DIR``: the Kaggle layout with three training folds, a preliminary-phase test set of whole
subjects renamed ``1.png`` ... with its labels CSV, and a few unlabelled final-phase cells.
``cnmc/demo_cells/ATTRIBUTION.md`` says where the cells come from and how they were chosen
(``cnmc/demo_cells/make_subset.py``).
"""

from __future__ import annotations

import os
import shutil
from importlib import resources
from pathlib import Path

from cnmc.errors import CnmcError

TREE = "C-NMC_Leukemia"
# The md5 that the committed ``data.dvc`` records for ``data/`` holding exactly these cells.
DEMO_DATA_HASH = "c754adfb89643cb77624ed893a088521"
DEMO_NOTE = ("the demo subset shipped with the project: 523 real C-NMC cells of 31 subjects (test: 83 cells "
             "of 12 unseen subjects). Its confidence intervals are wide, and it makes no claim about the "
             "full data set.")


def demo_cells() -> Path:
    """The shipped subset's folder (it holds ``C-NMC_Leukemia/``)."""
    return Path(str(resources.files("cnmc") / "demo_cells"))


def copy_demo_dataset(out_dir: Path) -> str:
    """Copy the shipped cells into ``out_dir`` (absent or empty), all at once or not at all.

    The copy is made in a hidden sibling folder that is renamed to ``out_dir`` at the end, so an
    interrupted copy never leaves a set that looks complete. Returns the one line the CLI prints.
    """
    out_dir = Path(out_dir)
    source = demo_cells() / TREE
    if not source.is_dir():
        raise CnmcError(f"{source}: the demo cells are missing from this installation (reinstall cnmc)")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise CnmcError(f"{out_dir}: exists and is not an empty folder; give a new or empty folder")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.{os.getpid()}.partial"
    shutil.rmtree(tmp, ignore_errors=True)  # only a dead run with our pid can have left it
    try:
        shutil.copytree(source, tmp / TREE, copy_function=shutil.copyfile)
        if out_dir.exists():
            out_dir.rmdir()
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    files = sum(1 for p in out_dir.rglob("*") if p.is_file())
    return (f"copied {files} files of the real C-NMC 2019 demo subset to {out_dir} "
            f"(attribution: {demo_cells() / 'ATTRIBUTION.md'})")
