"""The synthetic test data sets: Kaggle layout and names, byte-identical output, learnable classes."""

from __future__ import annotations

import csv
import hashlib
import io
import re
from pathlib import Path

import helpers.synthetic_cells as demo
import numpy as np
import pytest
from helpers.synthetic_cells import SyntheticConfig, write_synthetic_dataset
from PIL import Image

NAME = re.compile(r"UID_(H?\d+)_(\d+)_(\d+)_(all|hem)\.bmp")
ROOT = "C-NMC_Leukemia"
PRELIM = f"{ROOT}/validation_data/C-NMC_test_prelim_phase_data"
PRELIM_CSV = f"{ROOT}/validation_data/C-NMC_test_prelim_phase_data_labels.csv"
FINAL = f"{ROOT}/testing_data/C-NMC_test_final_phase_data"
SMALL = SyntheticConfig(
    train_subjects_per_class=4,
    prelim_subjects_per_class=2,
    all_cells_per_subject=3,
    hem_cells_per_subject=2,
    final_images=3,
    image_size=96,
)


def tree_sha256(root: Path) -> str:
    """One hash over every file's relative path and bytes: equal iff the two trees are identical."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def read_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.format == "BMP" and image.mode == "RGB"
        return np.asarray(image)


def read_prelim_labels(root: Path) -> list[dict[str, str]]:
    with (root / PRELIM_CSV).open(newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def small_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("small") / "data"
    write_synthetic_dataset(out, SMALL, seed=7)
    return out


def test_layout_counts_and_names(small_set: Path) -> None:
    train = sorted((small_set / ROOT / "training_data").glob("fold_*/*/*"))
    assert {p.parent.parent.name for p in train} == {"fold_0", "fold_1", "fold_2"}
    subjects: dict[str, set[str]] = {"all": set(), "hem": set()}
    fold_classes: dict[str, set[str]] = {}
    for path in train:
        match = NAME.fullmatch(path.name)
        assert match, path.name
        subject, _, _, label = match.groups()
        assert path.parent.name == label
        assert subject.startswith("H") == (label == "hem")
        subjects[label].add(subject)
        fold_classes.setdefault(path.parent.parent.name, set()).add(label)
    assert all(classes == {"all", "hem"} for classes in fold_classes.values())
    assert len(subjects["all"]) == len(subjects["hem"]) == SMALL.train_subjects_per_class
    labels = [NAME.fullmatch(p.name).group(4) for p in train]
    assert labels.count("all") == 4 * 3 and labels.count("hem") == 4 * 2
    folds_of = {}
    for path in train:
        folds_of.setdefault(NAME.fullmatch(path.name).group(1), set()).add(path.parent.parent.name)
    assert all(len(folds) == 1 for folds in folds_of.values()), "a subject spans folds"
    assert len({(p.name.split("_")[1], p.name.split("_")[2]) for p in train}) < len(train), (
        "expected several cells per image"
    )

    n_prelim = 2 * 3 + 2 * 2
    expected = sorted(f"{i}.bmp" for i in range(1, n_prelim + 1))
    assert sorted(p.name for p in (small_set / PRELIM).iterdir()) == expected
    assert sorted(p.name for p in (small_set / FINAL).iterdir()) == ["1.bmp", "2.bmp", "3.bmp"]
    assert sorted(p.name for p in small_set.iterdir()) == [ROOT]
    assert not list(small_set.parent.glob(".*partial")), "temporary folder left behind"


def test_prelim_labels_match_originals_and_new_subjects(small_set: Path) -> None:
    rows = read_prelim_labels(small_set)
    assert list(rows[0]) == ["Patient_ID", "new_names", "labels"]
    assert [r["new_names"] for r in rows] == [f"{i}.bmp" for i in range(1, len(rows) + 1)]
    train = (small_set / ROOT).glob("training_data/*/*/*")
    train_subjects = {NAME.fullmatch(p.name).group(1) for p in train}
    prelim_subjects = set()
    for row in rows:
        match = NAME.fullmatch(row["Patient_ID"])
        assert match, row
        assert row["labels"] == ("1" if match.group(4) == "all" else "0")
        prelim_subjects.add(match.group(1))
    assert len(prelim_subjects) == 2 * SMALL.prelim_subjects_per_class
    assert not prelim_subjects & train_subjects
    assert len({r["Patient_ID"] for r in rows}) == len(rows)
    labels = [r["labels"] for r in rows]
    assert labels != sorted(labels) and labels != sorted(labels, reverse=True), "not shuffled"


def test_images_are_450_purple_cells_on_black(tmp_path: Path) -> None:
    cfg = SyntheticConfig(
        train_subjects_per_class=3,
        prelim_subjects_per_class=1,
        all_cells_per_subject=1,
        hem_cells_per_subject=1,
        final_images=1,
    )
    write_synthetic_dataset(tmp_path / "data", cfg, seed=3)
    paths = sorted((tmp_path / "data").rglob("*.bmp"))
    assert len(paths) == 3 * 2 + 2 + 1
    for path in paths:
        rgb = read_rgb(path)
        assert rgb.shape == (450, 450, 3)
        for corner in (rgb[:20, :20], rgb[:20, -20:], rgb[-20:, :20], rgb[-20:, -20:]):
            assert not corner.any(), f"{path.name}: background corner is not black"
        cell = rgb[rgb.sum(axis=2) > 30].astype(float)
        assert 0.04 < len(cell) / (450 * 450) < 0.4, path.name
        red, green, blue = cell.mean(axis=0)
        colour = f"{path.name}: not purple ({red:.0f}, {green:.0f}, {blue:.0f})"
        assert red > green + 15 and blue > green + 15, colour


def test_same_seed_is_byte_identical_other_seed_differs(tmp_path: Path, small_set: Path) -> None:
    write_synthetic_dataset(tmp_path / "again", SMALL, seed=7)
    write_synthetic_dataset(tmp_path / "other", SMALL, seed=8)
    assert tree_sha256(tmp_path / "again") == tree_sha256(small_set)
    assert tree_sha256(tmp_path / "other") != tree_sha256(small_set)


def test_classes_differ_learnably_but_overlap(small_set: Path) -> None:
    """Cell area separates the classes on average, yet no threshold on it alone is perfect."""
    area: dict[str, list[int]] = {"all": [], "hem": []}
    for path in (small_set / ROOT / "training_data").glob("fold_*/*/*.bmp"):
        area[path.parent.name].append(int((read_rgb(path).sum(axis=2) > 30).sum()))
    assert np.mean(area["all"]) > 1.15 * np.mean(area["hem"])
    assert min(area["all"]) < max(area["hem"])


@pytest.mark.parametrize("width", [5, 6, 7, 8])
def test_bmp_writer_round_trips_through_pillow(width: int) -> None:
    rgb = np.arange(3 * 4 * width * 3, dtype=np.uint8).reshape(3 * 4, width, 3)
    with Image.open(io.BytesIO(demo.bmp_bytes(rgb))) as image:
        assert image.format == "BMP" and image.mode == "RGB"
        assert np.array_equal(np.asarray(image), rgb)
