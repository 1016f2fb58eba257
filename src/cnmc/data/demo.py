"""The demo data set: 523 real C-NMC 2019 cells shipped with the package, copied byte for byte.

``cnmc demo-data DIR`` (and so ``make demo``) copies ``cnmc/demo_cells/C-NMC_Leukemia`` into
``DIR``: the Kaggle layout with three training folds, a preliminary-phase test set of whole
subjects renamed ``1.png`` ... with its labels CSV, and a few unlabelled final-phase cells.
``cnmc/demo_cells/ATTRIBUTION.md`` says where the cells come from and how they were chosen
(``scripts/make_demo_subset.py`` in the repository).
"""

from __future__ import annotations

import shutil
from importlib import resources
from pathlib import Path

from cnmc.core.atomic import fill_new_folder
from cnmc.core.errors import CnmcError
from cnmc.data.images import IMAGE_EXTENSIONS

TREE = "C-NMC_Leukemia"
# The md5 that the committed ``data.dvc`` records for ``data/`` holding exactly these cells.
DEMO_DATA_HASH = "c754adfb89643cb77624ed893a088521"
DEMO_NOTE = (
    "the demo subset shipped with the project: 523 real C-NMC cells of 31 subjects (test: 83 cells "
    "of 12 unseen subjects). Its confidence intervals are wide, and it makes no claim about the "
    "full data set."
)


def demo_cells() -> Path:
    """The shipped subset's folder (it holds ``C-NMC_Leukemia/``)."""
    return Path(str(resources.files("cnmc") / "demo_cells"))


def copy_demo_dataset(out_dir: Path) -> str:
    """Copy the shipped cells into ``out_dir`` (absent or empty), all at once or not at all
    (:func:`cnmc.core.atomic.fill_new_folder`); return the one line the CLI prints."""
    out_dir = Path(out_dir)
    source = demo_cells() / TREE
    if not source.is_dir():
        raise CnmcError(f"{source}: the demo cells are missing from this installation (reinstall cnmc)")
    fill_new_folder(out_dir, lambda tmp: shutil.copytree(source, tmp / TREE, copy_function=shutil.copyfile))
    files = [p for p in out_dir.rglob("*") if p.is_file()]
    images = sum(1 for p in files if p.suffix.lower() in IMAGE_EXTENSIONS)
    return (
        f"copied the real C-NMC 2019 demo subset to {out_dir}: {images} images and "
        f"{len(files) - images} other file{'s' if len(files) - images != 1 else ''} (the labels CSV) "
        f"(attribution: {demo_cells() / 'ATTRIBUTION.md'})"
    )
