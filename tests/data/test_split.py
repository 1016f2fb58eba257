"""Split protocols: subject-disjointness, stratification, determinism, the paper's counts."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from cnmc.core.config import SplitConfig
from cnmc.core.errors import CnmcError
from cnmc.data.split import FOLD_COLUMN, split_manifest, write_splits

HOLDOUT = SplitConfig(validation="holdout")  # the holdout rules: whole subjects by image share
COLUMNS = ["path", "label", "subject", "source", "sha256", "width", "height", "original_mode", "original_name"]


def make_manifest(groups: list[tuple[str, str, str, int]]) -> pd.DataFrame:
    """Rows for (source, label, subject, n_images) groups, each image with a unique hash."""
    rows = []
    for source, label, subject, count in groups:
        for i in range(count):
            name = f"UID_{subject}_{i}_1_{label}.bmp"
            rows.append([f"data/{source}/{name}", label, subject, source, f"{source}{name}", 8, 8, "RGB", name])
    return pd.DataFrame(rows, columns=COLUMNS)


def cnmc_like(all_subjects: int = 10, hem_subjects: int = 10, prelim: bool = True) -> pd.DataFrame:
    groups = []
    for k in range(all_subjects):
        groups.append((f"fold_{k % 3}", "all", str(k + 1), 6 + k % 4))
    for k in range(hem_subjects):
        groups.append((f"fold_{k % 3}", "hem", f"H{k + 1}", 4 + k % 3))
    if prelim:
        groups += [("prelim", "all", "90", 5), ("prelim", "all", "91", 4), ("prelim", "hem", "H90", 3)]
    groups.append(("final", "", "", 3))
    return make_manifest(groups)


def subjects(splits, name: str) -> set[str]:
    return set(splits.tables[name]["subject"])


def test_subject_protocol_is_subject_disjoint_and_tests_on_prelim() -> None:
    splits = split_manifest(cnmc_like(), HOLDOUT, seed=1)
    assert not subjects(splits, "train") & subjects(splits, "val")
    assert not (subjects(splits, "train") | subjects(splits, "val")) & subjects(splits, "test")
    assert set(splits.tables["test"]["source"]) == {"prelim"}
    assert splits.report["subject_disjoint"] is True
    assert splits.report["unlabelled_images_left_out"] == 3
    # Validation holds whole subjects of both classes, about val_fraction of each class's images.
    assert set(splits.tables["val"]["label"]) == {"all", "hem"}
    for label in ("all", "hem"):
        assert abs(splits.report["splits"]["val"]["share_of_class"][label] - 0.2) < 0.05


def test_subject_protocol_without_prelim_holds_out_subjects_for_test() -> None:
    manifest = cnmc_like(prelim=False)
    splits = split_manifest(manifest, SplitConfig(validation="holdout", test_fraction=0.2), seed=3)
    names = ("train", "val", "test")
    for a in names:
        for b in names:
            if a < b:
                assert not subjects(splits, a) & subjects(splits, b)
    assert set(splits.tables["test"]["label"]) == {"all", "hem"}
    total = sum(len(splits.tables[name]) for name in ("train", "val", "test"))
    assert total == (manifest["label"] != "").sum()


def test_subject_in_folds_and_prelim_is_kept_out_of_training() -> None:
    manifest = make_manifest(
        [
            ("fold_0", "all", "1", 4),
            ("fold_1", "all", "2", 4),
            ("fold_2", "all", "3", 4),
            ("fold_0", "hem", "H1", 4),
            ("fold_1", "hem", "H2", 4),
            ("fold_2", "hem", "H3", 4),
            ("prelim", "all", "1", 2),
            ("prelim", "hem", "H9", 2),
        ]
    )
    splits = split_manifest(manifest, HOLDOUT, seed=0)
    assert "1" not in subjects(splits, "train") | subjects(splits, "val")
    assert splits.report["subject_disjoint"] is True


def test_split_is_deterministic_and_seed_dependent() -> None:
    manifest = cnmc_like(all_subjects=20, hem_subjects=20)
    a = split_manifest(manifest, HOLDOUT, seed=7)
    b = split_manifest(manifest.sample(frac=1, random_state=5), HOLDOUT, seed=7)
    c = split_manifest(manifest, HOLDOUT, seed=8)
    for name in ("train", "val", "test"):
        pd.testing.assert_frame_equal(a.tables[name], b.tables[name])
    assert subjects(a, "val") != subjects(c, "val")


def full_size_cnmc() -> pd.DataFrame:
    """Tiny rows with the full C-NMC 2019 counts: folds 7,272 ALL + 3,389 Hem, prelim 1,219 + 648."""
    groups = []
    for label, total, n_subjects, prefix in (("all", 7272, 47, ""), ("hem", 3389, 26, "H")):
        for k in range(n_subjects):
            count = total // n_subjects + (1 if k < total % n_subjects else 0)
            groups.append((f"fold_{k % 3}", label, f"{prefix}{k + 1}", count))
    for label, total, n_subjects, prefix in (("all", 1219, 15, ""), ("hem", 648, 13, "H")):
        for k in range(n_subjects):
            count = total // n_subjects + (1 if k < total % n_subjects else 0)
            groups.append(("prelim", label, f"{prefix}{100 + k}", count))
    return make_manifest(groups)


def test_paper_protocol_reproduces_the_papers_counts() -> None:
    splits = split_manifest(full_size_cnmc(), SplitConfig(protocol="paper"), seed=42)
    test = splits.report["splits"]["test"]["images_per_class"]
    assert sum(test.values()) == 1253
    assert test == {"all": 849, "hem": 404}  # the paper reports 847 + 406 (seed unknown)
    train_val = splits.report["ours_counts"]["train_plus_val"]
    assert sum(train_val.values()) == 11275
    assert splits.report["paper_reported_counts"]["test"] == {"all": 847, "hem": 406}
    # Stratified: the class ratio is the same in every split, to within one image.
    for name in ("train", "val", "test"):
        table = splits.tables[name]
        assert abs((table["label"] == "all").mean() - 8491 / 12528) < 1 / len(table) + 1e-9
    # Cell-level: subjects are shared, and the report says so.
    assert splits.report["subject_disjoint"] is False
    assert any("leakage" in note for note in splits.report["notes"])


def test_write_splits(tmp_path) -> None:
    splits = split_manifest(cnmc_like(), HOLDOUT, seed=1)
    write_splits(splits, tmp_path / "splits", tmp_path / "report.json")
    for name in ("train", "val", "test"):
        table = pd.read_csv(tmp_path / "splits" / f"{name}.csv", dtype=str, keep_default_na=False)
        assert list(table.columns) == COLUMNS + ["split"]
        assert set(table["split"]) == {name}
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["protocol"] == "subject"
    assert "1 all" not in splits.summary_line() and splits.summary_line().startswith("split (subject)")


def test_too_little_data_is_a_clear_error() -> None:
    manifest = make_manifest([("fold_0", "all", "1", 3), ("fold_0", "hem", "H1", 3)])
    with pytest.raises(CnmcError, match="split 'val' would be empty"):
        split_manifest(manifest, HOLDOUT, seed=0)
    with pytest.raises(CnmcError, match="no labelled images"):
        split_manifest(make_manifest([("final", "", "", 3)]), HOLDOUT, seed=0)


def test_a_separate_test_manifest_is_the_test_set() -> None:
    own = cnmc_like(prelim=False)
    extra = make_manifest([("folder", "all", "img:a", 1), ("folder", "hem", "img:b", 1), ("folder", "", "", 1)])
    splits = split_manifest(own, HOLDOUT, seed=0, test_manifest=extra)
    assert set(splits.tables["test"]["subject"]) == {"img:a", "img:b"}
    assert len(splits.tables["train"]) + len(splits.tables["val"]) == (own["label"] != "").sum()
    assert splits.report["unlabelled_images_left_out"] == 3 + 1


def unequal_subjects(prelim: bool = False) -> pd.DataFrame:
    """Subject sizes from 2 to 700 cells, as on the real data: a few donors hold most cells."""
    all_sizes = [700, 350, 200, 150, 90, 60, 45, 30, 20, 12, 8, 5, 3, 2, 2]
    hem_sizes = [400, 380, 60, 40, 25, 18, 10, 8, 4, 3, 2, 2]
    groups = [(f"fold_{k % 3}", "all", str(k + 1), n) for k, n in enumerate(all_sizes)]
    groups += [(f"fold_{k % 3}", "hem", f"H{k + 1}", n) for k, n in enumerate(hem_sizes)]
    if prelim:
        groups += [("prelim", "all", "90", 40), ("prelim", "hem", "H90", 30)]
    return make_manifest(groups)


@pytest.mark.parametrize("seed", [0, 1, 42])
def test_held_out_splits_get_their_share_of_images_not_of_subjects(seed) -> None:
    splits = split_manifest(unequal_subjects(), HOLDOUT, seed=seed)
    shares = {name: splits.report["splits"][name]["share_of_class"] for name in ("val", "test")}
    assert 0.15 <= shares["val"]["all"] <= 0.25 and 0.05 <= shares["test"]["all"] <= 0.15
    assert 0.05 <= shares["test"]["hem"] <= 0.15  # the small Hem donors
    # Hem: two donors of 400 and 380 cells; the rest hold 172. 20% of Hem is either all the small
    # ones that test left over, or one big donor (over twice the share): the small ones it is.
    assert splits.report["splits"]["val"]["images_per_class"]["hem"] > 0
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        assert not subjects(splits, a) & subjects(splits, b)
    for name in ("val", "test"):
        assert min(splits.report["splits"][name]["images_per_class"].values()) >= 30
    again = split_manifest(unequal_subjects().sample(frac=1, random_state=3), HOLDOUT, seed=seed)
    for name in ("train", "val", "test"):
        pd.testing.assert_frame_equal(splits.tables[name], again.tables[name])


def test_validation_share_is_of_images_around_a_fixed_test_set() -> None:
    splits = split_manifest(unequal_subjects(prelim=True), SplitConfig(validation="holdout", val_fraction=0.25), seed=5)
    assert set(splits.tables["test"]["source"]) == {"prelim"}
    share = splits.report["splits"]["val"]["share_of_class"]
    pool_all = 1677  # the ALL training cells
    assert abs(splits.report["splits"]["val"]["images_per_class"]["all"] / pool_all - 0.25) < 0.03
    assert share["hem"] > 0


def test_a_class_that_cannot_reach_the_minimum_is_named_with_its_counts(caplog) -> None:
    manifest = make_manifest(
        [
            ("fold_0", "all", "1", 40),
            ("fold_1", "all", "2", 40),
            ("fold_2", "all", "3", 40),
            ("fold_0", "hem", "H1", 5),
            ("fold_1", "hem", "H2", 4),
            ("fold_2", "hem", "H3", 3),
            ("prelim", "all", "9", 30),
            ("prelim", "hem", "H9", 30),
        ]
    )
    with caplog.at_level("WARNING"):
        splits = split_manifest(manifest, SplitConfig(validation="holdout", val_fraction=0.34), seed=0)
    message = (
        "split 'val': class 'hem' gets 4 images, below split.min_images_per_class = 30 "
        "(the pool holds 12 in 3 subjects)"
    )
    assert message in caplog.text and message in splits.report["notes"]
    assert splits.report["splits"]["val"]["images_per_class"]["all"] == 40
    one = make_manifest(
        [
            ("fold_0", "all", "1", 40),
            ("fold_1", "all", "2", 40),
            ("fold_0", "hem", "H1", 50),
            ("prelim", "all", "9", 30),
            ("prelim", "hem", "H9", 30),
        ]
    )
    notes = split_manifest(one, HOLDOUT, seed=0).report["notes"]
    assert any("'hem' gets 0 images" in note and "only one subject has that class" in note for note in notes)


def test_cross_fitting_puts_every_training_person_in_exactly_one_fold_and_no_test_person_in_any() -> None:
    manifest = cnmc_like(all_subjects=24, hem_subjects=15)
    splits = split_manifest(manifest, SplitConfig(validation="crossfit", folds=5), seed=3)
    train, val, test = (splits.tables[name] for name in ("train", "val", "test"))
    assert set(train["path"]) == set(val["path"])  # every training person also judges
    folds_of = val.groupby("subject")[FOLD_COLUMN].nunique()
    assert (folds_of == 1).all() and len(folds_of) == 24 + 15  # each person in exactly one fold
    assert sorted(val[FOLD_COLUMN].unique()) == [0, 1, 2, 3, 4]
    assert not subjects(splits, "test") & subjects(splits, "train")
    for fold in splits.report["folds"]:  # stratified by class: both classes judge in every fold
        assert fold["people_per_class"]["all"] >= 1 and fold["people_per_class"]["hem"] >= 1
    assert sum(f["people_per_class"]["hem"] for f in splits.report["folds"]) == 15
    assert splits.report["validation"] == "crossfit" and splits.report["subject_disjoint"]
    assert "5 folds" in splits.summary_line()


def test_a_class_with_fewer_than_k_people_lowers_k_and_one_person_keeps_the_holdout_split() -> None:
    splits = split_manifest(cnmc_like(all_subjects=10, hem_subjects=4), SplitConfig(folds=5), seed=0)
    assert splits.report["validation"] == "crossfit" and len(splits.report["folds"]) == 4
    assert all(fold["people_per_class"]["hem"] == 1 for fold in splits.report["folds"])  # each judges once
    assert any("over 4 folds, not split.folds = 5" in note for note in splits.report["notes"])
    one = split_manifest(cnmc_like(all_subjects=10, hem_subjects=2, prelim=True), SplitConfig(folds=5), seed=0)
    assert one.report["validation"] == "crossfit" and len(one.report["folds"]) == 2  # two donors: two folds
    alone = make_manifest([("fold_0", "all", str(k), 5) for k in range(6)] + [("fold_0", "hem", "H1", 9)])
    single = split_manifest(
        alone, SplitConfig(folds=5), seed=0, test_manifest=cnmc_like()[lambda t: t.source == "prelim"]
    )
    assert single.report["validation"] == "holdout" and FOLD_COLUMN not in single.tables["train"]
    assert any("needs 2 people of each class" in note for note in single.report["notes"])


@pytest.mark.parametrize("validation", ["crossfit", "holdout"])
def test_a_re_encoded_copy_under_another_person_is_one_group_kept_on_one_side(tmp_path, validation) -> None:
    """Real demo cells; one of person 11's cells saved again as a JPEG under person 38's name."""
    import shutil

    from PIL import Image

    from cnmc.data.demo import demo_cells
    from cnmc.data.manifest import build_manifest

    source = demo_cells() / "C-NMC_Leukemia" / "training_data"
    data = tmp_path / "C-NMC_Leukemia" / "training_data" / "fold_0"
    for label, people in (("all", ("11", "14", "16", "2", "30", "38")), ("hem", ("H10", "H14", "H6", "H7"))):
        (data / label).mkdir(parents=True)
        for person in people:
            for path in sorted(source.glob(f"fold_*/{label}/UID_{person}_*"))[:6]:
                shutil.copy(path, data / label / path.name)
    original = sorted((data / "all").glob("UID_11_*"))[0]
    Image.open(original).convert("RGB").save(data / "all" / "UID_38_99_1_all.jpg", quality=90)
    manifest = build_manifest(tmp_path)
    crossing = [g for g in manifest.duplicates if g.leaks]
    assert len(crossing) == 1 and crossing[0].subjects == ("11", "38") and not crossing[0].identical_bytes
    table = manifest.table
    for seed in range(5):
        cfg = SplitConfig(validation=validation, folds=2, test_fraction=0.3, val_fraction=0.3, min_images_per_class=1)
        splits = split_manifest(table, cfg, seed)
        sides = {
            person: {
                (name, str(t.loc[t["subject"] == person, FOLD_COLUMN].iat[0]) if validation == "crossfit" else "")
                for name, t in splits.tables.items()
                if (t["subject"] == person).any() and not (validation == "crossfit" and name == "val")
            }
            for person in ("11", "38")
        }
        assert sides["11"] == sides["38"], seed  # the same split (and fold): the picture never crosses
        assert splits.report["people_tied_by_shared_pictures"] == [["11", "38"]]
        assert splits.report["shared_pictures_across_splits"] == 0 and splits.report["subject_disjoint"]
        if validation == "crossfit":  # the note counts the folds made
            assert any("in 2 subject-grouped folds" in note for note in splits.report["notes"])
        assert set(splits.tables["train"]["subject"]) | set(splits.tables["test"]["subject"]) >= {"11"}


def test_a_picture_in_both_the_training_and_the_test_folder_keeps_its_people_out_of_training(tmp_path) -> None:
    import shutil

    from PIL import Image

    from cnmc.data.demo import demo_cells
    from cnmc.data.manifest import build_manifest, shared_pictures

    source = demo_cells() / "C-NMC_Leukemia" / "training_data"

    def folder(root, people: dict[str, tuple[str, ...]]):
        data = root / "C-NMC_Leukemia" / "training_data" / "fold_0"
        for label, names in people.items():
            (data / label).mkdir(parents=True)
            for person in names:
                for path in sorted(source.glob(f"fold_*/{label}/UID_{person}_*"))[:6]:
                    shutil.copy(path, data / label / path.name)
        return data

    folder(tmp_path / "train", {"all": ("11", "14", "16", "2"), "hem": ("H10", "H14", "H6")})
    test = folder(tmp_path / "test", {"all": ("30",), "hem": ("H7",)})
    h6_cell = sorted((tmp_path / "train").rglob("UID_H6_*"))[0]
    Image.open(h6_cell).convert("RGB").save(test / "hem" / "UID_H7_99_1_hem.jpg", quality=90)
    train_manifest, test_manifest = build_manifest(tmp_path / "train"), build_manifest(tmp_path / "test")
    table, test_table = shared_pictures(train_manifest, test_manifest)
    cfg = SplitConfig(validation="holdout", val_fraction=0.3, min_images_per_class=1)
    splits = split_manifest(table, cfg, 0, test_manifest=test_table)
    assert "H6" not in set(splits.tables["train"]["subject"]) | set(splits.tables["val"]["subject"])
    assert any("H6" in note and "test set" in note for note in splits.report["notes"])
    assert set(splits.tables["test"]["subject"]) == {"30", "H7"}
