"""The manifest stage on tiny generated layouts, on bad files, and on the real sample."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import socket
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cnmc.cli import main
from cnmc.core.errors import CnmcError
from cnmc.data import manifest as manifest_module
from cnmc.data.manifest import MANIFEST_COLUMNS, build_manifest, read_manifest, write_manifest

SAMPLE = Path(__file__).resolve().parents[3] / "shared" / "data" / "cnmc-sample"
PRELIM = "C-NMC_Leukemia/validation_data/C-NMC_test_prelim_phase_data"
PRELIM_CSV = "C-NMC_Leukemia/validation_data/C-NMC_test_prelim_phase_data_labels.csv"
FOLD_ALL = "C-NMC_Leukemia/training_data/fold_0/all"
PRELIM_ROWS = [  # Patient_ID, new_names, labels
    ("UID_7_1_1_all.bmp", "1.bmp", "1"),
    ("UID_H8_1_1_hem.bmp", "2.bmp", "0"),
    ("UID_7_2_1_all.bmp", "3.bmp", "1"),
    ("UID_H8_3_1_hem.bmp", "4.bmp", "0"),
]


def image(path: Path, mode: str = "RGB", size: int = 8, fmt: str | None = None) -> Path:
    """A small image whose pixels depend on its path, so no two test images are identical."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(zlib.crc32(path.as_posix().encode()))
    if mode == "I;16":
        Image.fromarray(rng.integers(0, 65535, (size, size), dtype=np.uint16)).save(path, fmt)
    else:
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).convert(mode).save(path, fmt)
    return path


def write_csv(path: Path, rows: list[tuple[str, ...]], header: str = "Patient_ID,new_names,labels") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([header, *(",".join(r) for r in rows)]) + "\n")


def make_kaggle(base: Path, nested: bool = False) -> Path:
    """A tiny Kaggle-mirror data set: 2 folds, a renamed prelim set with its CSV, 2 final images."""
    train = base / "C-NMC_Leukemia" / "training_data"
    cells = {
        "fold_0": [
            "UID_1_1_1_all",
            "UID_1_1_2_all",
            "UID_3_1_1_all",
            "UID_H2_1_1_hem",
            "UID_H2_2_1_hem",
        ],
        "fold_1": ["UID_4_1_1_all", "UID_H5_1_1_hem"],
    }
    for fold, names in cells.items():
        folder = train / fold / fold if nested else train / fold
        for name in names:
            image(folder / name.rsplit("_", 1)[1] / f"{name}.bmp")
    for _, new, _ in PRELIM_ROWS:
        image(base / PRELIM / new)
    write_csv(base / PRELIM_CSV, PRELIM_ROWS)
    for n in (1, 2):
        image(base / "C-NMC_Leukemia/testing_data/C-NMC_test_final_phase_data" / f"{n}.bmp")
    return base


def rows_by_name(table: pd.DataFrame) -> dict[str, dict[str, object]]:
    return {Path(p).name: row for p, row in zip(table["path"], table.to_dict("records"), strict=True)}


def reasons(manifest) -> dict[str, str]:
    """Exclusion reasons by file name (skipped folders by their full path)."""
    return {e.path.rsplit("/", 1)[1] if not e.path.endswith("/") else e.path: e.reason for e in manifest.excluded}


def test_kaggle_manifest_columns_and_values(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_kaggle(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    manifest = build_manifest(Path("data"))
    table = manifest.table
    assert tuple(table.columns) == MANIFEST_COLUMNS
    assert list(table["path"]) == sorted(table["path"])
    assert len(table) == 7 + 4 + 2 and not manifest.excluded and not manifest.converted
    rows = rows_by_name(table)
    first = rows["UID_1_1_1_all.bmp"]
    assert first == {
        "path": f"data/{FOLD_ALL}/UID_1_1_1_all.bmp",
        "label": "all",
        "subject": "1",
        "source": "fold_0",
        "sha256": hashlib.sha256(Path(f"data/{FOLD_ALL}/UID_1_1_1_all.bmp").read_bytes()).hexdigest(),
        "width": 8,
        "height": 8,
        "original_mode": "RGB",
        "original_name": "UID_1_1_1_all.bmp",
        "content_group": "",
    }
    assert (rows["UID_H5_1_1_hem.bmp"]["subject"], rows["UID_H5_1_1_hem.bmp"]["source"]) == (
        "H5",
        "fold_1",
    )
    final = table[table["source"] == "final"]
    assert set(final["label"]) == {""}
    assert list(final["subject"]) == [f"img:testing_data/C-NMC_test_final_phase_data/{n}" for n in (1, 2)]
    assert manifest.counts() == {
        "fold_0": {"all": 3, "hem": 2},
        "fold_1": {"all": 1, "hem": 1},
        "prelim": {"all": 2, "hem": 2},
        "final": {"unlabelled": 2},
    }


def test_prelim_label_and_subject_come_from_the_csv(tmp_path: Path) -> None:
    manifest = build_manifest(make_kaggle(tmp_path))
    prelim = manifest.table[manifest.table["source"] == "prelim"]
    got = {
        Path(p).name: (lab, subj, orig)
        for p, lab, subj, orig in prelim[["path", "label", "subject", "original_name"]].itertuples(index=False)
    }
    assert got == {
        "1.bmp": ("all", "7", "UID_7_1_1_all.bmp"),
        "2.bmp": ("hem", "H8", "UID_H8_1_1_hem.bmp"),
        "3.bmp": ("all", "7", "UID_7_2_1_all.bmp"),
        "4.bmp": ("hem", "H8", "UID_H8_3_1_hem.bmp"),
    }


def test_nested_kaggle_folds(tmp_path: Path) -> None:
    manifest = build_manifest(make_kaggle(tmp_path, nested=True))
    fold_1 = manifest.table[manifest.table["source"] == "fold_1"]
    assert sorted(Path(p).relative_to(tmp_path).as_posix() for p in fold_1["path"]) == [
        "C-NMC_Leukemia/training_data/fold_1/fold_1/all/UID_4_1_1_all.bmp",
        "C-NMC_Leukemia/training_data/fold_1/fold_1/hem/UID_H5_1_1_hem.bmp",
    ]
    assert not manifest.excluded


def test_tcia_layout_manifest(tmp_path: Path) -> None:
    root = tmp_path / "PKG - C-NMC 2019"
    image(root / "C-NMC_training_data/fold_2/all/UID_1_1_1_all.bmp")
    image(root / "C-NMC_training_data/fold_2/hem/UID_H1_1_1_hem.bmp")
    image(root / "C-NMC_test_prelim_phase_data/2.bmp")
    write_csv(
        root / "C-NMC_test_prelim_phase_data/C-NMC_test_prelim_phase_data_labels.csv",
        [PRELIM_ROWS[1]],
    )
    image(root / "C-NMC_test_final_phase_data/9.bmp")
    manifest = build_manifest(tmp_path)
    table = manifest.table
    # The labels CSV inside the prelim folder is read, not reported as a stray file.
    assert manifest.layout.kind == "tcia" and not manifest.excluded
    assert list(zip(table["source"], table["label"], table["subject"], strict=True)) == [
        ("final", "", "img:C-NMC_test_final_phase_data/9"),
        ("prelim", "hem", "H8"),
        ("fold_2", "all", "1"),
        ("fold_2", "hem", "H1"),
    ]


def test_class_folder_manifest(tmp_path: Path) -> None:
    image(tmp_path / "ALL" / "Im001.jpg", fmt="JPEG")
    image(tmp_path / "ALL" / "sub" / "Im002.png")
    image(tmp_path / "Hem" / "UID_H3_1_1_hem.tif")
    image(tmp_path / "Hem" / "Im131.jpeg", fmt="JPEG")
    manifest = build_manifest(tmp_path)
    table = manifest.table
    assert manifest.layout.kind == "folder" and set(table["source"]) == {"folder"}
    assert dict(zip(table["original_name"], zip(table["label"], table["subject"], strict=True), strict=True)) == {
        "Im001.jpg": ("all", "img:ALL/Im001"),
        "Im002.png": ("all", "img:ALL/sub/Im002"),
        "UID_H3_1_1_hem.tif": ("hem", "H3"),
        "Im131.jpeg": ("hem", "img:Hem/Im131"),
    }
    assert "4 images (2 all, 2 hem) from 4 subjects, layout folder" in manifest.summary_line()


def odd_dds() -> bytes:
    """A DDS with unknown pixel-format flags (Pillow's DDS decoder raised NotImplementedError)."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, "DDS")
    data = bytearray(buffer.getvalue())
    data[80:84] = struct.pack("<I", 16)
    return bytes(data)


def add_bad_files(base: Path) -> None:
    """Every kind of trouble the stage must survive, next to the good files."""
    folder = base / FOLD_ALL
    (folder / "UID_9_1_1_all.bmp").write_bytes(b"")
    truncated = image(folder / "UID_9_1_2_all.bmp", size=32).read_bytes()
    (folder / "UID_9_1_2_all.bmp").write_bytes(truncated[: len(truncated) // 2])
    (folder / "UID_9_1_3_all.bmp").write_text("this is not a bitmap\n")
    (folder / "UID_9_1_4_all.bmp").write_bytes(odd_dds())
    (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (folder / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    (folder / "desktop.ini").write_text("[.ShellClassInfo]\n")
    (folder / "notes.txt").write_text("stray\n")
    (folder / "._UID_1_1_1_all.bmp").write_bytes(b"\x00\x05\x16\x07")
    image(folder / "cell.bmp")
    image(folder / "UID_9_2_1_all.png", mode="L")
    image(folder / "UID_9_2_2_all.png", mode="RGBA")
    image(folder / "UID_9_2_3_all.png", mode="I;16")
    image(folder / "uid_9_3_1_ALL.BMP")  # untidy but fine
    image(folder / "UID_10_1_1_hem.bmp")  # the name contradicts the folder
    image(folder / "UID_H9_1_1_all.bmp")  # a healthy donor in the ALL folder
    image(base / "C-NMC_Leukemia/training_data/fold_0/hem/UID_9_4_1_hem.bmp")  # an ALL patient as hem
    image(base / "C-NMC_Leukemia/training_data/fold_0/UID_9_5_1_all.bmp")  # outside a class folder
    image(base / "C-NMC_Leukemia/training_data/fold_7/all/UID_9_6_1_all.bmp")  # no such fold
    image(base / PRELIM / "99.bmp")  # not in the CSV
    write_csv(base / PRELIM_CSV, [*PRELIM_ROWS, ("UID_7_9_1_all.bmp", "5.bmp", "1")])  # 5.bmp absent
    image(base / "C-NMC_Leukemia/__MACOSX/x.bmp")


def test_bad_files_are_excluded_or_converted_with_reasons(tmp_path: Path) -> None:
    base = make_kaggle(tmp_path)
    add_bad_files(base)
    manifest = build_manifest(base)
    got = reasons(manifest)
    expected = {
        "UID_9_1_1_all.bmp": "empty file",
        "UID_9_1_2_all.bmp": "corrupt or truncated",
        "UID_9_1_3_all.bmp": "not an image",
        # a DDS named .bmp: no decoder outside BMP/PNG/JPEG/TIFF is tried (the odd DDS once reached Pillow's)
        "UID_9_1_4_all.bmp": "not an image of a format cnmc reads (BMP, PNG, JPEG, TIFF)",
        ".DS_Store": "hidden or system file",
        "Thumbs.db": "hidden or system file",
        "desktop.ini": "hidden or system file",
        "._UID_1_1_1_all.bmp": "hidden or system file",
        "notes.txt": "not an image file type (.txt)",
        "cell.bmp": "file name does not match UID_<subject>_<image>_<cell>_<all|hem>",
        "UID_10_1_1_hem.bmp": "name says hem but its folder all/ says all",
        "UID_H9_1_1_all.bmp": "subject H9 is a healthy donor (H prefix) but labelled all",
        "UID_9_4_1_hem.bmp": "subject 9 is an ALL patient (no H prefix) but labelled hem",
        "UID_9_5_1_all.bmp": "outside the recognised image folders",
        "UID_9_6_1_all.bmp": "outside the recognised image folders",
        "99.bmp": "not listed in C-NMC_test_prelim_phase_data_labels.csv",
        "5.bmp": "listed in C-NMC_test_prelim_phase_data_labels.csv but the file is missing",
        f"{base.as_posix()}/C-NMC_Leukemia/__MACOSX/": "hidden or system folder",
    }
    assert set(got) == set(expected)
    for name, reason in expected.items():
        assert got[name].startswith(reason), (name, got[name])
    converted = {Path(c.path).name: c.from_mode for c in manifest.converted}
    assert converted == {
        "UID_9_2_1_all.png": "L",
        "UID_9_2_2_all.png": "RGBA",
        "UID_9_2_3_all.png": "I;16",
    }
    rows = rows_by_name(manifest.table)
    assert rows["uid_9_3_1_ALL.BMP"]["subject"] == "9" and rows["UID_9_2_3_all.png"]["original_mode"] == "I;16"
    assert len(manifest.table) == 13 + 4
    assert manifest.summary_line("outputs/data_report.json") == (
        "manifest: 17 images (10 all, 5 hem, 2 unlabelled) from 8 subjects, layout kaggle; "
        "3 converted, 18 excluded (see outputs/data_report.json), 0 duplicate groups"
    )


@pytest.mark.timeout(60)  # two links to . or .. made the old walk endless
def test_links_are_not_followed_out_of_their_folder_nor_listed_twice(tmp_path: Path) -> None:
    base = make_kaggle(tmp_path)
    plain = build_manifest(base).table
    fold = base / "C-NMC_Leukemia/training_data/fold_0"
    (fold / "all/here").symlink_to(".")
    (fold / "all/up").symlink_to("..")
    (fold / "all/hem_cells").symlink_to("../hem")
    (fold / "all/UID_2_1_1_all.bmp").symlink_to("../hem/UID_H2_1_1_hem.bmp")  # a Hem cell as ALL
    (fold / "all/UID_1_9_1_all.bmp").symlink_to("UID_1_1_1_all.bmp")  # a listed cell, again
    os.link(fold / "hem/UID_H2_1_1_hem.bmp", fold / "hem/UID_H2_9_1_hem.bmp")
    (fold / "all/UID_1_8_1_all.bmp").symlink_to("gone.bmp")
    (fold / "all/UID_1_7_1_all.bmp").symlink_to("UID_1_7_1_all.bmp")
    manifest = build_manifest(base)
    pd.testing.assert_frame_equal(manifest.table, plain)
    assert not manifest.duplicates
    folder, real = fold.as_posix(), Path(os.path.realpath(fold)).as_posix()
    assert {e.path: e.reason for e in manifest.excluded} == {
        f"{folder}/all/here/": "symbolic link to a folder (not followed)",
        f"{folder}/all/up/": "symbolic link to a folder (not followed)",
        f"{folder}/all/hem_cells/": "symbolic link to a folder (not followed)",
        f"{folder}/all/UID_2_1_1_all.bmp": (
            f"symbolic link to {real}/hem/UID_H2_1_1_hem.bmp, outside its folder all/ (not followed)"
        ),
        f"{folder}/all/UID_1_9_1_all.bmp": f"same file as {folder}/all/UID_1_1_1_all.bmp (listed once)",
        f"{folder}/hem/UID_H2_9_1_hem.bmp": f"same file as {folder}/hem/UID_H2_1_1_hem.bmp (listed once)",
        f"{folder}/all/UID_1_8_1_all.bmp": "broken symbolic link to gone.bmp (no such file)",
        f"{folder}/all/UID_1_7_1_all.bmp": "symbolic link loop",
    }


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="FIFOs and Unix sockets are POSIX")
def test_special_files_are_excluded_without_being_opened(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the real CLI in a subprocess: opening the FIFO would block it, and the timeout fail the test."""
    base = make_kaggle(tmp_path / "data")
    fold = base / "C-NMC_Leukemia/training_data/fold_0"
    os.mkfifo(fold / "all/UID_6_1_1_all.bmp")
    monkeypatch.chdir(fold / "hem")  # a relative name: socket paths are limited to about 100 bytes
    with socket.socket(socket.AF_UNIX) as server:
        server.bind("UID_H6_1_1_hem.bmp")
    out = tmp_path / "out"
    src = Path(manifest_module.__file__).parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(src), os.environ.get("PYTHONPATH")]))}
    command = ["manifest", str(base), "-q", "-o", str(out / "m.csv"), "--report", str(out / "r.json")]
    proc = subprocess.run([sys.executable, "-m", "cnmc", *command], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "r.json").read_text())
    assert {e["path"]: e["reason"] for e in report["excluded"]} == {
        f"{fold.as_posix()}/all/UID_6_1_1_all.bmp": "not a regular file (FIFO)",
        f"{fold.as_posix()}/hem/UID_H6_1_1_hem.bmp": "not a regular file (socket)",
    }
    assert report["totals"]["images"] == 13


def test_missing_labels_csv_is_an_error(tmp_path: Path) -> None:
    base = make_kaggle(tmp_path)
    (base / PRELIM_CSV).unlink()
    with pytest.raises(CnmcError, match="labels CSV C-NMC_test_prelim_phase_data_labels.csv not found"):
        build_manifest(base)


@pytest.mark.parametrize(
    ("header", "rows", "message"),
    [
        ("name,file,label", PRELIM_ROWS, "expected columns Patient_ID,new_names,labels"),
        (
            None,
            [*PRELIM_ROWS[:3], ("UID_H8_3_1_hem.bmp", "4.bmp", "2")],
            "labels must be 1 .ALL. or 0 .Hem.; row 5",
        ),
        (None, [*PRELIM_ROWS[:3], ("UID_H8_3_1_hem.bmp", "4.bmp", "hem")], "labels must be"),
        (None, [*PRELIM_ROWS, ("UID_7_5_1_all.bmp", "1.bmp", "1")], "duplicate new_names: 1.bmp"),
        (None, [*PRELIM_ROWS, ("UID_7_1_1_all.bmp", "5.bmp", "1")], "duplicate Patient_ID"),
        (None, [*PRELIM_ROWS, ("", "5.bmp", "1")], "row 6 has no Patient_ID"),
        (None, [], "has no rows"),
    ],
)
def test_malformed_labels_csv_is_an_error(tmp_path: Path, header: str | None, rows: list, message: str) -> None:
    base = make_kaggle(tmp_path)
    write_csv(base / PRELIM_CSV, rows, header=header or "Patient_ID,new_names,labels")
    with pytest.raises(CnmcError, match=message) as info:
        build_manifest(base)
    assert "C-NMC_test_prelim_phase_data_labels.csv" in str(info.value)


def test_labels_csv_with_bom_and_spaces_is_fine(tmp_path: Path) -> None:
    base = make_kaggle(tmp_path)
    text = "\ufeffPatient_ID, new_names, labels\n" + "".join(f"{a}, {b}, {c}\n" for a, b, c in PRELIM_ROWS)
    (base / PRELIM_CSV).write_text(text, encoding="utf-8")
    assert (build_manifest(base).table["source"] == "prelim").sum() == 4


def test_prelim_csv_contradictions_are_excluded(tmp_path: Path) -> None:
    base = make_kaggle(tmp_path)
    rows = [
        PRELIM_ROWS[0],
        ("UID_H8_1_1_hem.bmp", "2.bmp", "1"),
        ("garbage.bmp", "3.bmp", "1"),
        PRELIM_ROWS[3],
    ]
    write_csv(base / PRELIM_CSV, rows)
    got = reasons(build_manifest(base))
    assert got["2.bmp"] == "name says hem but the labels CSV says all (Patient_ID UID_H8_1_1_hem.bmp)"
    assert got["3.bmp"].startswith("its Patient_ID 'garbage.bmp' does not match")


def test_nothing_usable_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "all").mkdir()
    (tmp_path / "hem").mkdir()
    with pytest.raises(CnmcError, match="no image files found"):
        build_manifest(tmp_path)
    (tmp_path / "all" / "a.bmp").write_bytes(b"")
    (tmp_path / "hem" / "Thumbs.db").write_bytes(b"x")
    with pytest.raises(
        CnmcError,
        match=r"no usable images under .*: all 2 files excluded \(e.g. .*a.bmp: empty file\)",
    ):
        build_manifest(tmp_path)


def test_duplicates_are_kept_and_reported(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    base = make_kaggle(tmp_path)
    train = base / "C-NMC_Leukemia/training_data"
    source = train / "fold_0/all/UID_1_1_1_all.bmp"
    shutil.copy(source, train / "fold_1/all/UID_4_9_1_all.bmp")  # other subject, other fold: leakage
    shutil.copy(train / "fold_0/hem/UID_H2_1_1_hem.bmp", train / "fold_0/hem/UID_H2_9_1_hem.bmp")  # harmless
    with caplog.at_level(logging.WARNING, logger="cnmc"):
        manifest = build_manifest(base)
    assert len(manifest.table) == 15
    groups = manifest.report()["duplicates"]
    assert [len(g["paths"]) for g in groups] == [2, 2]
    leak = next(g for g in groups if g["crosses_subjects"])
    assert leak["subjects"] == ["1", "4"] and leak["sources"] == ["fold_0", "fold_1"]
    assert leak["crosses_sources"] and not leak["crosses_labels"]
    assert leak["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    same = next(g for g in groups if not g["crosses_subjects"])
    assert not same["crosses_sources"] and same["subjects"] == ["H2"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "leakage" in warnings[0] and "UID_4_9_1_all.bmp" in warnings[0]
    assert manifest.summary_line().endswith("2 duplicate groups")


def test_output_does_not_depend_on_workers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base = make_kaggle(tmp_path / "data")
    add_bad_files(base)
    monkeypatch.setattr(manifest_module, "PARALLEL_MIN", 1)  # use the process pool even here
    outputs = []
    for workers in (1, 3):
        out = tmp_path / f"out{workers}"
        write_manifest(build_manifest(base, workers=workers), out / "m.csv", out / "r.json")
        outputs.append(((out / "m.csv").read_bytes(), (out / "r.json").read_bytes()))
    assert outputs[0] == outputs[1]


def test_write_and_read_round_trip(tmp_path: Path) -> None:
    manifest = build_manifest(make_kaggle(tmp_path / "data"))
    csv, report = tmp_path / "out" / "deep" / "manifest.csv", tmp_path / "out" / "report.json"
    write_manifest(manifest, csv, report)
    assert sorted(p.name for p in (tmp_path / "out").rglob("*")) == [
        "deep",
        "manifest.csv",
        "report.json",
    ]
    table = read_manifest(csv)
    pd.testing.assert_frame_equal(table, manifest.table, check_dtype=False)
    assert table["width"].dtype.kind == "i" and set(table.loc[table["source"] == "final", "label"]) == {""}
    data = json.loads(report.read_text())
    assert data["layout"] == "kaggle" and data["totals"]["images"] == 13
    assert data["subjects"]["hem"] == {"count": 3, "ids": ["H2", "H5", "H8"]}
    assert data["subjects"]["all"] == {"count": 4, "ids": ["1", "3", "4", "7"]}
    assert set(data) >= {"root", "totals", "counts", "converted", "excluded", "duplicates"}


def test_read_manifest_rejects_other_files(tmp_path: Path) -> None:
    with pytest.raises(CnmcError, match="manifest not found"):
        read_manifest(tmp_path / "missing.csv")
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(CnmcError, match=r"bad.csv: not a manifest: expected columns path,label"):
        read_manifest(bad)
    bad.write_text(",".join(MANIFEST_COLUMNS) + "\nx.bmp,all,1,fold_0,abc,eight,8,RGB,x.bmp\n")
    with pytest.raises(CnmcError, match="width and height must be whole numbers"):
        read_manifest(bad)
    bad.write_text(",".join(MANIFEST_COLUMNS) + "\nx.bmp,ALL,1,fold_0,abc,8,8,RGB,x.bmp\n")
    with pytest.raises(CnmcError, match="unknown label 'ALL'"):
        read_manifest(bad)
    bad.write_text("")
    with pytest.raises(CnmcError, match="not a manifest CSV"):
        read_manifest(bad)


def test_cli_manifest(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = make_kaggle(tmp_path / "data")
    out = tmp_path / "outputs"
    code = main(
        [
            "manifest",
            str(base),
            "-q",
            "-o",
            str(out / "manifest.csv"),
            "--report",
            str(out / "r.json"),
        ]
    )
    assert code == 0
    assert capsys.readouterr().out.startswith("manifest: 13 images (6 all, 5 hem, 2 unlabelled) from 7 subjects")
    assert len(read_manifest(out / "manifest.csv")) == 13


def test_cli_unknown_layout_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "x.jpg").write_bytes(b"")
    code = main(
        [
            "manifest",
            str(tmp_path),
            "-q",
            "-o",
            str(tmp_path / "m.csv"),
            "--report",
            str(tmp_path / "r.json"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("cnmc manifest: error: no C-NMC data found in") and err.count("\n") == 1
    assert not (tmp_path / "m.csv").exists()


@pytest.mark.skipif(not SAMPLE.is_dir(), reason=f"real C-NMC sample not found at {SAMPLE} (fresh clone)")
def test_real_sample(tmp_path: Path) -> None:
    manifest = build_manifest(SAMPLE)
    table = manifest.table
    assert manifest.layout.kind == "kaggle" and not manifest.excluded and not manifest.converted
    assert not manifest.duplicates
    assert manifest.counts() == {"fold_0": {"all": 13, "hem": 13}, "prelim": {"all": 6, "hem": 6}}
    assert set(table["width"]) == {450} and set(table["height"]) == {450} and set(table["original_mode"]) == {"RGB"}

    def subjects(source: str, label: str) -> set[str]:
        return set(table.loc[(table["source"] == source) & (table["label"] == label), "subject"])

    assert subjects("fold_0", "all") == {"1", "3", "4", "5", "11"}
    assert subjects("fold_0", "hem") == {"H6", "H7", "H11", "H12", "H15"}
    assert subjects("prelim", "all") == {"2", "16", "23"}
    assert subjects("prelim", "hem") == {"H10", "H14", "H22"}
    csv = pd.read_csv(SAMPLE / PRELIM_CSV, dtype=str)
    prelim = table[table["source"] == "prelim"].set_index("original_name")
    for patient_id, new_name, label in csv.itertuples(index=False):
        row = prelim.loc[patient_id]
        assert Path(row["path"]).name == new_name
        assert row["label"] == {"1": "all", "0": "hem"}[label]
    write_manifest(manifest, tmp_path / "m.csv", tmp_path / "r.json")
    assert manifest.summary_line() == (
        "manifest: 38 images (19 all, 19 hem) from 16 subjects, layout kaggle; "
        "0 converted, 0 excluded (see the data report), 0 duplicate groups"
    )
