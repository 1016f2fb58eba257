"""Layout detection and C-NMC file-name parsing (names and folders only, no pixels)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cnmc.core.errors import CnmcError
from cnmc.data.layout import CellName, detect_layout, parse_cell_name


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()
    return path


def kaggle(base: Path, nested: bool = False) -> Path:
    """A bare Kaggle-mirror tree under ``base/C-NMC_Leukemia``; returns that root."""
    root = base / "C-NMC_Leukemia"
    for k in range(3):
        fold = root / "training_data" / f"fold_{k}"
        fold = fold / f"fold_{k}" if nested else fold
        touch(fold / "all" / f"UID_{k + 1}_1_1_all.bmp")
        touch(fold / "hem" / f"UID_H{k + 1}_1_1_hem.bmp")
    touch(root / "validation_data" / "C-NMC_test_prelim_phase_data" / "1.bmp")
    touch(root / "validation_data" / "C-NMC_test_prelim_phase_data_labels.csv")
    touch(root / "testing_data" / "C-NMC_test_final_phase_data" / "1.bmp")
    return root


def sources(layout) -> dict[str, str]:
    return {f"{g.source}/{g.label}": (g.directory.relative_to(layout.root).as_posix()) for g in layout.groups}


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("UID_11_1_2_all.bmp", CellName("11", 1, 2, "all")),
        ("UID_H11_3_1_hem.bmp", CellName("H11", 3, 1, "hem")),
        (
            "uid_h11_1_2_ALL.BMP",
            CellName("H11", 1, 2, "all"),
        ),  # parsed; the label check is elsewhere
        ("UID_H7_14_1_Hem.Png", CellName("H7", 14, 1, "hem")),
        ("UID_16_1_1_all", CellName("16", 1, 1, "all")),  # a Patient_ID may lack the extension
        (" UID_5_2_3_hem.tiff ", CellName("5", 2, 3, "hem")),
        ("UID_23_2_1_all.jpeg", CellName("23", 2, 1, "all")),
    ],
)
def test_parse_cell_name(name: str, expected: CellName) -> None:
    assert parse_cell_name(name) == expected


@pytest.mark.parametrize(
    "name",
    [
        "1.bmp",
        "UID_11_1_all.bmp",
        "UID_11_1_2_3_all.bmp",
        "UID_11_1_2_xyz.bmp",
        "UID_X11_1_2_all.bmp",
        "UID_HH11_1_2_all.bmp",
        "copy of UID_11_1_2_all.bmp",
        "UID_11_1_2_all (1).bmp",
        "UID_11_1_2_all.bmp.txt",
        "UID_11_1_2_all.gif",
        "",
    ],
)
def test_parse_cell_name_rejects(name: str) -> None:
    assert parse_cell_name(name) is None


def test_h_and_plain_ids_are_different_subjects() -> None:
    plain, hem = parse_cell_name("UID_11_1_1_all.bmp"), parse_cell_name("UID_H11_1_1_hem.bmp")
    assert plain is not None and hem is not None
    assert plain.subject != hem.subject
    assert not plain.hem_subject and hem.hem_subject


@pytest.mark.parametrize("nested", [False, True])
def test_kaggle_layout_found_from_parent_or_root(tmp_path: Path, nested: bool) -> None:
    root = kaggle(tmp_path / "data", nested=nested)
    for start in (tmp_path, tmp_path / "data", root):
        layout = detect_layout(start)
        assert (layout.kind, layout.root) == ("kaggle", root)
    inner = "/fold_0" if nested else ""
    assert sources(layout)["fold_0/all"] == f"training_data/fold_0{inner}/all"
    assert sources(layout)["fold_2/hem"] == f"training_data/fold_2{'/fold_2' if nested else ''}/hem"
    assert sources(layout)["prelim/"] == "validation_data/C-NMC_test_prelim_phase_data"
    assert sources(layout)["final/"] == "testing_data/C-NMC_test_final_phase_data"
    assert layout.labels_csv == root / "validation_data" / "C-NMC_test_prelim_phase_data_labels.csv"
    assert len(layout.groups) == 8


def test_kaggle_layout_tolerates_case_and_macos_debris(tmp_path: Path) -> None:
    root = tmp_path / "C-NMC_Leukemia"
    touch(root / "Training_Data" / "FOLD_1" / "ALL" / "UID_1_1_1_all.bmp")
    touch(root / "Training_Data" / "FOLD_1" / "Hem" / "UID_H1_1_1_hem.bmp")
    touch(tmp_path / "__MACOSX" / "C-NMC_Leukemia" / "training_data" / "fold_0" / "all" / "._x.bmp")
    layout = detect_layout(tmp_path)
    assert layout.root == root
    assert sources(layout) == {
        "fold_1/all": "Training_Data/FOLD_1/ALL",
        "fold_1/hem": "Training_Data/FOLD_1/Hem",
    }
    assert layout.labels_csv is None and layout.prelim_dir is None


def test_tcia_layout(tmp_path: Path) -> None:
    root = tmp_path / "PKG - C-NMC 2019"
    touch(root / "C-NMC_training_data" / "fold_0" / "all" / "UID_1_1_1_all.bmp")
    touch(root / "C-NMC_training_data" / "fold_0" / "hem" / "UID_H1_1_1_hem.bmp")
    csv = touch(root / "C-NMC_test_prelim_phase_data" / "C-NMC_test_prelim_phase_data_labels.csv")
    touch(root / "C-NMC_test_prelim_phase_data" / "1.bmp")
    touch(root / "C-NMC_test_final_phase_data" / "1.bmp")
    layout = detect_layout(tmp_path)
    assert (layout.kind, layout.root, layout.labels_csv) == ("tcia", root, csv)
    assert sorted(sources(layout)) == ["final/", "fold_0/all", "fold_0/hem", "prelim/"]


def test_class_folder_layout(tmp_path: Path) -> None:
    touch(tmp_path / "cells" / "ALL" / "a.png")
    touch(tmp_path / "cells" / "Hem" / "b.jpg")
    layout = detect_layout(tmp_path)
    assert (layout.kind, layout.root) == ("folder", tmp_path / "cells")
    assert sources(layout) == {"folder/all": "ALL", "folder/hem": "Hem"}


def test_unknown_layout_names_what_it_looks_for(tmp_path: Path) -> None:
    touch(tmp_path / "images" / "x.bmp")
    touch(tmp_path / "all" / "y.bmp")  # one class folder is not a data set
    with pytest.raises(CnmcError) as info:
        detect_layout(tmp_path)
    message = str(info.value)
    assert "\n" not in message
    assert str(tmp_path) in message
    for expected in ("Kaggle", "TCIA", "class folders", "fold_N"):
        assert expected in message


def test_missing_data_dir(tmp_path: Path) -> None:
    with pytest.raises(CnmcError, match="does not exist"):
        detect_layout(tmp_path / "nope")
    with pytest.raises(CnmcError, match="is not a folder"):
        detect_layout(touch(tmp_path / "file.bmp"))


def test_two_data_sets_side_by_side_are_ambiguous(tmp_path: Path) -> None:
    kaggle(tmp_path / "a")
    kaggle(tmp_path / "b")
    with pytest.raises(CnmcError, match="several data sets"):
        detect_layout(tmp_path)


def test_links_to_folders_are_not_followed(tmp_path: Path) -> None:
    root = kaggle(tmp_path / "real")
    fold_2 = root / "training_data" / "fold_2"
    for path in sorted(fold_2.rglob("*"), reverse=True):
        path.rmdir() if path.is_dir() else path.unlink()
    fold_2.rmdir()
    fold_2.symlink_to("fold_1")  # would put fold_1's cells in a second fold
    layout = detect_layout(root)
    assert sorted(sources(layout)) == ["final/", "fold_0/all", "fold_0/hem", "fold_1/all", "fold_1/hem", "prelim/"]
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "cnmc").symlink_to(root)
    with pytest.raises(CnmcError, match="cnmc is a symbolic link to a folder, which is not followed: name the folder"):
        detect_layout(tmp_path / "data")
    assert detect_layout(tmp_path / "data" / "cnmc").root == tmp_path / "data" / "cnmc"  # named: followed


def test_a_training_folder_of_folds_is_read_whole_with_every_fold() -> None:
    """``--data .../training_data`` (what a user points at first) takes all three folds, not one."""
    from cnmc.data.demo import demo_cells
    from cnmc.data.manifest import build_manifest

    training = demo_cells() / "C-NMC_Leukemia" / "training_data"
    layout = detect_layout(training)
    assert layout.kind == "folds" and {g.source for g in layout.groups} == {"fold_0", "fold_1", "fold_2"}
    table = build_manifest(training, progress=False).table
    assert set(table["source"]) == {"fold_0", "fold_1", "fold_2"} and set(table["label"]) == {"all", "hem"}


@pytest.mark.parametrize(
    "name", ["UID_11_1_2_all.bmp", "UID_011_1_2_all.bmp", "UID_１１_1_2_all.bmp", "ＵＩＤ＿１１_1_2_all.bmp"]
)
def test_one_person_has_one_name_whatever_the_zeros_or_the_digits(name: str) -> None:
    cell = parse_cell_name(name)
    assert cell is not None and cell.subject == "11"
    assert parse_cell_name("UID_h007_3_1_hem.png").subject == "H7"  # type: ignore[union-attr]


def test_the_manifest_reports_a_person_written_several_ways_and_the_split_keeps_them_together(tmp_path: Path) -> None:
    """``11``, ``011`` and full-width ``１１`` are one person: one subject, reported, on one side."""
    import shutil

    from cnmc.core.config import SplitConfig
    from cnmc.data.demo import demo_cells
    from cnmc.data.manifest import build_manifest
    from cnmc.data.split import split_manifest

    source = demo_cells() / "C-NMC_Leukemia" / "training_data"
    data = Path(shutil.copytree(source, tmp_path / "training_data"))
    eleven = sorted((data / "fold_0" / "all").glob("UID_11_*"))
    assert len(eleven) >= 3
    for path, spelled in zip(eleven[:2], ("011", "１１"), strict=False):
        path.rename(path.with_name(path.name.replace("UID_11_", f"UID_{spelled}_")))
    manifest = build_manifest(data, progress=False)
    assert manifest.spellings() == {"11": ["011", "11", "１１"]}
    assert "1 subject written several ways (merged)" in manifest.summary_line()
    assert (manifest.table["subject"] == "11").sum() == len(eleven)
    for seed in range(5):
        splits = split_manifest(manifest.table, SplitConfig(validation="holdout"), seed=seed)
        sides = [name for name, table in splits.tables.items() if (table["subject"] == "11").any()]
        assert len(sides) == 1 and splits.report["subject_disjoint"]
