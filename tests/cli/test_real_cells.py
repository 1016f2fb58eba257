"""End to end on real C-NMC cells: ``cnmc train --data DIR --test-data DIR2`` on a small subset
of ``../shared/data/cnmc-real`` with the pretrained lite0 (skipped where that folder is absent)."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import yaml

from cnmc.cli import main

ROOT = Path(__file__).resolve().parents[2]
REAL = ROOT.parent / "shared" / "data" / "cnmc-real" / "C-NMC_Leukemia" / "training_data"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not REAL.is_dir(), reason="../shared/data/cnmc-real is absent (real cells are not shipped)"),
]
NAME = re.compile(r"UID_(H?\d+)_")
# Training: ALL and Hem subjects of very different sizes; test: other people.
TRAIN = {"1": 12, "3": 11, "4": 12, "11": 12, "14": 12, "16": 12, "H6": 12, "H7": 12, "H10": 40, "H14": 40}
TEST = {"2": 10, "30": 10, "H12": 8, "H3": 4}


def copy_subjects(take: dict[str, int], out: Path) -> Path:
    """The first ``take[s]`` cells of each subject ``s``, in the Kaggle layout, byte for byte."""
    for path in sorted(REAL.glob("fold_*/*/*.png")):
        subject = NAME.match(path.name).group(1)
        taken = out.glob(f"C-NMC_Leukemia/training_data/*/*/UID_{subject}_*")
        if subject in take and sum(1 for _ in taken) < take[subject]:
            target = out / "C-NMC_Leukemia" / "training_data" / path.relative_to(REAL)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
    return out


def test_default_path_on_real_cells_of_unseen_people(
    tmp_path: Path, mlflow_db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    copy_subjects(TRAIN, tmp_path / "real")
    copy_subjects(TEST, tmp_path / "unseen")
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["split"]["min_images_per_class"] = 20
    raw["split"]["min_subjects_per_class"] = 2  # this small set's validation holds 2 people a class
    raw["augment"]["workers"] = 1
    raw["train"]["batch_size"] = 16
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    code = main(
        [
            "train",
            "--backbone",
            "tf_efficientnet_lite0",
            "--data",
            "real",
            "--test-data",
            "unseen",
            "--epochs",
            "1",
            "--image-size",
            "32",
            "--metrics-out",
            "m.json",
            "--quiet",
        ]
    )
    assert code == 0
    split = json.loads((tmp_path / "outputs/direct/split_report.json").read_text())
    val = split["splits"]["val"]
    assert min(val["images_per_class"].values()) >= 20 and split["subject_disjoint"]
    assert set(split["splits"]["test"]["images_per_class"].values()) == {20, 12}
    augment = json.loads((tmp_path / "outputs/direct/images/augment_report.json").read_text())
    assert augment["config"]["per_class"] == "auto"
    assert all(c["dropped"] == 0 for c in augment["splits"]["train"]["classes"].values())
    document = json.loads((tmp_path / "m.json").read_text())
    assert document["validation"]["can_judge"] is True
    assert document["test"]["at_tuned"]["n_subjects"] == 4 and 0 <= document["test"]["at_tuned"]["roc_auc"] <= 1
    # The default path cross-fits over the training people: one model per fold, served as their mean.
    assert split["validation"] == "crossfit" and document["folds"] == len(split["folds"]) >= 2
    models = tmp_path / "outputs/direct/models/tf_efficientnet_lite0"
    assert all(os.path.isfile(models / f"weights_fold{k}.pt") for k in range(document["folds"]))
