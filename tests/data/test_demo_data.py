"""The shipped demo set: real C-NMC cells in the real layout, copied byte for byte, safely."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import pytest

from cnmc.cli import main
from cnmc.core.errors import CnmcError
from cnmc.data import demo
from cnmc.data.demo import copy_demo_dataset, demo_cells
from cnmc.data.manifest import build_manifest

SHIPPED = demo_cells()
PRELIM_CSV = "C-NMC_Leukemia/validation_data/C-NMC_test_prelim_phase_data_labels.csv"
REAL = Path(__file__).resolve().parents[3] / "shared" / "data" / "cnmc-real"


def digests(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def manifest():
    return build_manifest(SHIPPED, workers=1, progress=False)


def test_the_shipped_subset_is_the_real_layout_with_nothing_excluded(manifest) -> None:
    table, report = manifest.table, manifest.report()
    assert report["layout"] == "kaggle" and report["excluded"] == [] and report["converted"] == []
    labelled = table[table["label"] != ""]
    counts = labelled.groupby(["source", "label"]).size().to_dict()
    assert counts == {
        ("fold_0", "all"): 64,
        ("fold_0", "hem"): 36,
        ("fold_1", "all"): 200,
        ("fold_1", "hem"): 130,
        ("fold_2", "all"): 4,
        ("prelim", "all"): 60,
        ("prelim", "hem"): 23,
    }
    assert (table["source"] == "final").sum() == 6 and (table.loc[table["source"] == "final", "label"] == "").all()
    subjects = labelled.groupby("label")["subject"].nunique().to_dict()
    assert subjects == {"all": 20, "hem": 11}  # at least 12 ALL and 6 Hem subjects
    # The renamed preliminary cells get their subjects back from the labels CSV's Patient_ID.
    prelim = labelled[labelled["source"] == "prelim"]
    assert set(prelim["subject"]) == {"1", "3", "4", "18", "24", "H1", "H2", "H3", "H4", "H5", "H12", "H15"}
    assert not set(prelim["subject"]) & set(labelled.loc[labelled["source"] != "prelim", "subject"])
    with (SHIPPED / PRELIM_CSV).open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["new_names"] for r in rows] == [f"{i}.png" for i in range(1, 84)]
    assert sum(p.stat().st_size for p in SHIPPED.rglob("*") if p.is_file()) < 25 * 10**6


@pytest.mark.skipif(not REAL.is_dir(), reason="../shared/data/cnmc-real is absent (fresh clone)")
def test_every_shipped_cell_is_a_cnmc_real_file_byte_for_byte() -> None:
    real = set(digests(REAL).values())
    shipped = {path: digest for path, digest in digests(SHIPPED / "C-NMC_Leukemia").items() if path.endswith(".png")}
    assert len(shipped) == 523 and set(shipped.values()) <= real
    with (SHIPPED / PRELIM_CSV).open(newline="") as handle:
        originals = {r["new_names"]: r["Patient_ID"] for r in csv.DictReader(handle)}
    by_name = {Path(p).name: d for p, d in digests(REAL).items()}
    prelim = "validation_data/C-NMC_test_prelim_phase_data/"
    for new, original in originals.items():
        assert shipped[prelim + new] == by_name[original], new


def test_copy_is_byte_for_byte_and_refuses_a_non_empty_folder(tmp_path: Path, capsys) -> None:
    out = tmp_path / "data"
    assert main(["demo-data", str(out)]) == 0
    assert "523 images and 1 other file (the labels CSV)" in capsys.readouterr().out
    assert [p.name for p in out.iterdir()] == ["C-NMC_Leukemia"]
    assert digests(out / "C-NMC_Leukemia") == digests(SHIPPED / "C-NMC_Leukemia")
    assert main(["demo-data", str(out)]) == 2
    err = capsys.readouterr().err
    assert str(out) in err and "not an empty folder" in err and err.count("\n") == 1
    empty = tmp_path / "empty"
    empty.mkdir()
    copy_demo_dataset(empty)
    assert (empty / PRELIM_CSV).is_file()


def test_a_failed_copy_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def failing(src: str, dst: str) -> None:
        calls.append(src)
        if len(calls) > 5:
            raise OSError("disk full")
        Path(dst).write_bytes(Path(src).read_bytes())

    monkeypatch.setattr(demo.shutil, "copyfile", failing)
    with pytest.raises(OSError):
        copy_demo_dataset(tmp_path / "data")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(demo, "demo_cells", lambda: tmp_path / "nowhere")
    with pytest.raises(CnmcError, match="demo cells are missing"):
        copy_demo_dataset(tmp_path / "data")


def test_the_committed_data_dvc_is_the_demo_hash_the_report_and_card_recognise() -> None:
    from cnmc.data.demo import DEMO_DATA_HASH
    from cnmc.tracking.provenance import data_hash

    assert data_hash(Path(__file__).resolve().parents[2]) == DEMO_DATA_HASH
