"""Choose the shipped demo subset of real C-NMC 2019 cells and copy it byte for byte.

Run once by a maintainer, from the project root, on the 2,997-cell ``cnmc-real`` folder:

    .venv/bin/python scripts/make_demo_subset.py ../shared/data/cnmc-real src/cnmc/demo_cells

The rule (seeded, so the choice can be redone exactly):
- Preliminary-phase test set: whole subjects, as the real data set has it. Hem: every Hem subject
  with at most ``SMALL_HEM`` cells; ALL: whole ALL subjects of at most ``MAX_PRELIM_ALL_SUBJECT``
  cells, drawn in seeded order until they hold ``PRELIM_ALL`` cells. Their cells are renamed
  ``1.png``, ``2.png``, ... in a seeded order, and the labels CSV maps each new name back to its
  original file name (``Patient_ID``), label 1 = ALL, 0 = Hem.
- Training folds: every other subject in its original fold folder, with at most ``CAP_ALL``
  (ALL) or ``CAP_HEM`` (Hem) of its cells, a seeded sample.
- Final phase (unlabelled): ``FINAL_EACH`` unused cells of the largest ALL and of the largest Hem
  subject, renamed ``1.png`` ... as in the real final-phase folder.
Files are copied with ``shutil.copyfile``: the PNGs are the source's bytes (lossless conversions
of the original 24-bit BMPs), never re-encoded.
"""

from __future__ import annotations

import csv
import random
import re
import shutil
import sys
from collections import defaultdict
from pathlib import Path

SEED = 2019
SMALL_HEM = 10
MAX_PRELIM_ALL_SUBJECT = 40
PRELIM_ALL = 60
CAP_ALL = 25
CAP_HEM = 65
FINAL_EACH = 3
NAME = re.compile(r"UID_(H?\d+)_(\d+)_(\d+)_(all|hem)\.png$", re.IGNORECASE)
TRAINING = Path("C-NMC_Leukemia/training_data")
PRELIM = Path("C-NMC_Leukemia/validation_data/C-NMC_test_prelim_phase_data")
LABELS = PRELIM.parent / "C-NMC_test_prelim_phase_data_labels.csv"
FINAL = Path("C-NMC_Leukemia/testing_data/C-NMC_test_final_phase_data")


def cells_by_subject(source: Path) -> dict[str, list[Path]]:
    out: dict[str, list[Path]] = defaultdict(list)
    for path in sorted((source / TRAINING).glob("fold_*/*/*.png")):
        match = NAME.match(path.name)
        if match:
            out[match.group(1)].append(path)
    return dict(out)


def choose(subjects: dict[str, list[Path]], rng: random.Random) -> tuple[list[Path], list[Path], list[Path]]:
    """(prelim cells, training cells, final cells) by the rule in the module docstring."""
    hem = sorted(s for s in subjects if s.startswith("H"))
    all_ = sorted(s for s in subjects if not s.startswith("H"))
    prelim_subjects = [s for s in hem if len(subjects[s]) <= SMALL_HEM]
    candidates = [s for s in all_ if len(subjects[s]) <= MAX_PRELIM_ALL_SUBJECT]
    rng.shuffle(candidates)
    taken = 0
    for subject in candidates:
        if taken >= PRELIM_ALL:
            break
        prelim_subjects.append(subject)
        taken += len(subjects[subject])
    prelim = [p for s in sorted(prelim_subjects) for p in subjects[s]]
    training, leftovers = [], {}
    for subject in sorted(set(subjects) - set(prelim_subjects)):
        cells = list(subjects[subject])
        rng.shuffle(cells)
        cap = CAP_HEM if subject.startswith("H") else CAP_ALL
        training += sorted(cells[:cap])
        leftovers[subject] = cells[cap:]
    final = []
    for group in (all_, hem):
        largest = max((s for s in group if s not in prelim_subjects), key=lambda s: len(subjects[s]))
        final += leftovers[largest][:FINAL_EACH]
    return prelim, training, final


def write_subset(source: Path, out: Path) -> None:
    rng = random.Random(SEED)
    prelim, training, final = choose(cells_by_subject(source), rng)
    if (out / "C-NMC_Leukemia").exists():
        shutil.rmtree(out / "C-NMC_Leukemia")
    for path in training:
        target = out / path.relative_to(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    order = list(prelim)
    rng.shuffle(order)
    (out / PRELIM).mkdir(parents=True)
    rows = []
    for number, path in enumerate(order, start=1):
        shutil.copyfile(path, out / PRELIM / f"{number}.png")
        match = NAME.match(path.name)
        assert match is not None  # the subset was chosen by this pattern
        rows.append((path.name, f"{number}.png", 1 if match.group(4).lower() == "all" else 0))
    with open(out / LABELS, "w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(("Patient_ID", "new_names", "labels"))
        writer.writerows(rows)
    (out / FINAL).mkdir(parents=True)
    for number, path in enumerate(final, start=1):
        shutil.copyfile(path, out / FINAL / f"{number}.png")
    size = sum(p.stat().st_size for p in (out / "C-NMC_Leukemia").rglob("*") if p.is_file())
    print(
        f"{len(training)} training, {len(prelim)} preliminary, {len(final)} final cells; "
        f"{size / 2**20:.1f} MiB in {out / 'C-NMC_Leukemia'}"
    )


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: make_demo_subset.py CNMC_REAL_DIR OUT_DIR")
    write_subset(Path(sys.argv[1]), Path(sys.argv[2]))
