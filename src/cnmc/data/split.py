"""Cut the manifest into train/val/test under one of two protocols.

``subject`` (default) is subject-disjoint, as the ISBI 2019 challenge evaluated: no person's
cells are on both sides of a split. ``paper`` reproduces Ahmed et al. 2025: a cell-level
stratified 90/10 split of the training folds plus the preliminary set, which lets cells of
one subject land in train and test and so inflates scores; the report says so.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from sklearn.model_selection import StratifiedGroupKFold, train_test_split

from cnmc.core.atomic import atomic_write_text
from cnmc.core.config import SPLITS, SplitConfig
from cnmc.core.errors import CnmcError
from cnmc.data.manifest import natural_key

log = logging.getLogger(__name__)

LABELS = ("all", "hem")
FOLD_COLUMN = "fold"  # under cross-fitting, the fold whose model each training person judges
PERSON = "person"  # while people sharing a picture are split as one unit, each row's own subject
TRAINING_SOURCES = ("fold_0", "fold_1", "fold_2", "folder")
# Random subject orders tried per class when choosing held-out subjects (fewer for many subjects,
# so that the search stays within a few million prefix sums).
SEARCH_ORDERS = 2000
SEARCH_BUDGET = 2_000_000
MAX_HELD_OUT_SHARE = 0.5  # of a class's images, unless the fraction asked for is larger
# Ahmed et al. 2025, Table 1: their train (incl. any validation) and test counts.
PAPER_COUNTS = {"train": {"all": 7644, "hem": 3631}, "test": {"all": 847, "hem": 406}}


@dataclass(frozen=True)
class Splits:
    """The three split tables (manifest columns plus ``split``) and the split report."""

    protocol: str
    tables: dict[str, pd.DataFrame]
    report: dict[str, Any] = field(default_factory=dict)

    def summary_line(self) -> str:
        parts = []
        for name in SPLITS:
            if name == "val" and cross_fitted(self.tables["val"]):
                parts.append(f"val = the same people out of fold ({self.tables['val'][FOLD_COLUMN].nunique()} folds)")
                continue
            table = self.tables[name]
            counts = table["label"].value_counts()
            parts.append(
                f"{name} {len(table):,} ({counts.get('all', 0):,} all, {counts.get('hem', 0):,} hem; "
                f"{table['subject'].nunique():,} subjects)"
            )
        return f"split ({self.protocol}): " + ", ".join(parts)


def split_manifest(
    manifest: pd.DataFrame, cfg: SplitConfig, seed: int, test_manifest: pd.DataFrame | None = None
) -> Splits:
    """Split the labelled rows of ``manifest``; unlabelled (final-phase) rows are left out.

    With ``test_manifest`` (a user's separate test data), its labelled rows are the test set and
    ``manifest`` only gives train and validation.
    """
    labelled = _labelled(manifest)
    if labelled.empty:
        raise CnmcError("manifest has no labelled images (label 'all' or 'hem') to split")
    unlabelled = len(manifest) - len(labelled)
    test = None
    if test_manifest is not None:
        test = _labelled(test_manifest)
        if test.empty:
            raise CnmcError("test data has no labelled images (label 'all' or 'hem')")
        unlabelled += len(test_manifest) - len(test)
    tied: list[list[str]] = []
    if cfg.protocol == "subject":
        (labelled, test), tied = tie_people(labelled, test)
    if test is not None:
        tables, notes = _fixed_test_split(labelled, test, cfg, seed)
    elif cfg.protocol == "paper":
        tables, notes = _paper_split(labelled, cfg, seed)
    else:
        tables, notes = _subject_split(labelled, cfg, seed)
    if cfg.protocol == "subject" and cfg.validation == "crossfit":
        tables, notes = _cross_fit(tables, cfg, seed, notes)
    for name in SPLITS:
        if tables[name].empty:
            raise CnmcError(
                f"split '{name}' would be empty under protocol '{cfg.protocol}' "
                f"({len(labelled)} labelled images, {labelled['subject'].nunique()} subjects): add data "
                "or change split.val_fraction / split.test_fraction in params.yaml"
            )
    tables = {
        name: _untied(tables[name]).sort_values("path").assign(split=name).reset_index(drop=True) for name in SPLITS
    }
    if tied:
        notes.append(
            "people sharing a picture (the same image, or a re-encoded copy, under two names) were kept on one side "
            "of every split: " + "; ".join(" and ".join(group) for group in tied)
        )
    report = _report(tables, cfg, seed, notes, unlabelled=unlabelled)
    report["people_tied_by_shared_pictures"] = tied
    if cfg.protocol == "subject" and report["subject_overlap"]:
        raise CnmcError(f"subject-disjoint split failed: subjects in two splits {report['subject_overlap']}")
    return Splits(cfg.protocol, tables, report)


def tie_people(
    labelled: pd.DataFrame, test: pd.DataFrame | None
) -> tuple[tuple[pd.DataFrame, pd.DataFrame | None], list[list[str]]]:
    """Subjects that share a picture (a manifest ``content_group``) become one unit of the split,
    so no picture sits on both sides: their ``subject`` is the unit (``A+B``) until :func:`_untied`
    restores it from ``person``. Returns the tables and the groups of people tied."""
    tables = [t for t in (labelled, test) if t is not None]
    both = pd.concat(tables, ignore_index=True)
    if "content_group" not in both.columns or not (both["content_group"] != "").any():
        return (labelled, test), []
    subjects = sorted(both["subject"].unique(), key=natural_key)
    number = {subject: i for i, subject in enumerate(subjects)}
    shared = both[both["content_group"] != ""]
    firsts = shared.groupby("content_group")["subject"].transform("first")
    edges = (shared["subject"].map(number).to_numpy(), firsts.map(number).to_numpy())
    graph = coo_matrix((np.ones(len(shared), dtype=np.int8), edges), shape=(len(subjects), len(subjects)))
    _, component = connected_components(graph, directed=False)
    members: dict[int, list[str]] = {}
    for subject, c in zip(subjects, component, strict=True):
        members.setdefault(int(c), []).append(subject)
    unit = {subject: "+".join(group) for group in members.values() for subject in group}
    tied = [group for group in members.values() if len(group) > 1]

    def tie(table: pd.DataFrame) -> pd.DataFrame:
        return table.assign(**{PERSON: table["subject"], "subject": table["subject"].map(unit)})

    return (tie(labelled), None if test is None else tie(test)), tied


def _untied(table: pd.DataFrame) -> pd.DataFrame:
    """A split table with each row's own subject back (see :func:`tie_people`)."""
    return table.assign(subject=table[PERSON]).drop(columns=PERSON) if PERSON in table.columns else table


def _labelled(manifest: pd.DataFrame) -> pd.DataFrame:
    return manifest[manifest["label"].isin(LABELS)].reset_index(drop=True)


def write_splits(splits: Splits, out_dir: Path, report_path: Path) -> None:
    """Write ``<out_dir>/{train,val,test}.csv`` and the JSON report, each atomically."""
    for name, table in splits.tables.items():
        atomic_write_text(out_dir / f"{name}.csv", table.to_csv(index=False))
    atomic_write_text(report_path, json.dumps(splits.report, indent=2) + "\n")


def _subject_split(labelled: pd.DataFrame, cfg: SplitConfig, seed: int) -> tuple[dict, list[str]]:
    prelim = labelled[labelled["source"] == "prelim"]
    pool = labelled[labelled["source"] != "prelim"]
    if not prelim.empty:
        tables, notes = _fixed_test_split(pool, prelim, cfg, seed)
        return tables, ["test = the labelled preliminary-phase set (unseen subjects), as in ISBI 2019", *notes]
    rng = np.random.default_rng(seed)
    test_subjects, notes = _pick_subjects(pool, cfg.test_fraction, cfg.min_images_per_class, rng, "test")
    test = pool[pool["subject"].isin(test_subjects)]
    rest = pool[~pool["subject"].isin(test_subjects)]
    # The validation fraction is of all labelled images, so of the rest it is a larger share.
    val_share = _share_of_rest(pool, rest, cfg.val_fraction)
    val_subjects, val_notes = _pick_subjects(rest, val_share, cfg.min_images_per_class, rng, "val")
    notes = [
        "no preliminary set: test = held-out subjects of the training data, chosen by image share per class",
        "validation = whole held-out training subjects, chosen by image share per class",
        *notes,
        *val_notes,
    ]
    return _train_val(rest, val_subjects) | {"test": test}, notes


def _share_of_rest(pool: pd.DataFrame, rest: pd.DataFrame, fraction: float) -> dict[str, float]:
    """Per class, the share of ``rest`` that is ``fraction`` of ``pool``'s images (capped below 1)."""
    shares = {}
    for label in LABELS:
        left = int((rest["label"] == label).sum())
        shares[label] = min(0.95, fraction * int((pool["label"] == label).sum()) / left) if left else fraction
    return shares


def _fixed_test_split(pool: pd.DataFrame, test: pd.DataFrame, cfg: SplitConfig, seed: int) -> tuple[dict, list[str]]:
    """Train/val from ``pool`` around a given test set; no test subject may stay in training."""
    notes: list[str] = []
    clash = sorted(set(pool["subject"]) & set(test["subject"]))
    if clash:
        log.warning(
            "subjects %s are in both the training data and the test set: their training cells are left out", clash
        )
        notes.append(f"left out training cells of subjects also in the test set: {clash}")
        pool = pool[~pool["subject"].isin(clash)]
    if cfg.protocol == "paper":
        train, val = train_test_split(
            pool.sort_values("path"),
            test_size=cfg.val_fraction,
            stratify=pool.sort_values("path")["label"],
            random_state=seed,
        )
        notes.append(f"validation = a stratified {cfg.val_fraction:.0%} of the training cells")
        return {"train": train, "val": val, "test": test}, notes
    notes.append("validation = whole held-out training subjects, chosen by image share per class")
    val_subjects, val_notes = _pick_subjects(
        pool, cfg.val_fraction, cfg.min_images_per_class, np.random.default_rng(seed), "val"
    )
    return _train_val(pool, val_subjects) | {"test": test}, notes + val_notes


def _cross_fit(
    tables: dict[str, pd.DataFrame], cfg: SplitConfig, seed: int, notes: list[str]
) -> tuple[dict, list[str]]:
    """Every training person in one of ``split.folds`` subject-grouped folds, stratified by class
    (sklearn's ``StratifiedGroupKFold``): ``train`` and ``val`` then both list all of them, with
    the column ``fold``; fold k's model trains on the other folds' people and judges fold k's, so
    every person teaches K-1 models and judges one. Every fold needs a person of each class, so a
    class with fewer than K people (but at least 2) lowers K to its count, which a note says; with
    one person in a class, nobody of that class could judge unseen, and the holdout split stands."""
    pool = pd.concat([tables["train"], tables["val"]]).sort_values("path").reset_index(drop=True)
    people = {label: pool.loc[pool["label"] == label, "subject"].nunique() for label in LABELS}
    k = min(cfg.folds, *people.values())
    counts = ", ".join(f"{n} '{label}'" for label, n in people.items())
    if k < 2:
        return tables, [*notes, f"cross-fitting needs 2 people of each class, the training data has {counts}: holdout"]
    if k < cfg.folds:
        notes = [*notes, f"cross-fitting over {k} folds, not split.folds = {cfg.folds}: the training data has {counts}"]
    folds = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed % 2**32)
    pool[FOLD_COLUMN] = -1
    for fold, (_, rows) in enumerate(folds.split(pool, pool["label"], groups=pool["subject"])):
        pool.loc[rows, FOLD_COLUMN] = fold
    kept = [n for n in notes if not n.startswith("validation = ") and not n.startswith("split 'val'")]
    note = (
        f"validation = cross-fitting: the {len(pool):,} training cells' {pool['subject'].nunique()} people in "
        f"{k} subject-grouped folds stratified by class; each fold's model judges its people, so every "
        "choice (epoch, threshold, temperature, TTA) is made on out-of-fold predictions of all of them"
    )
    return {"train": pool, "val": pool.copy(), "test": tables["test"]}, [*kept, note]


def cross_fitted(table: pd.DataFrame) -> bool:
    """Whether a split table (or a store's index) carries cross-fitting folds."""
    return FOLD_COLUMN in table.columns


def _train_val(pool: pd.DataFrame, val_subjects: set[str]) -> dict[str, pd.DataFrame]:
    return {"train": pool[~pool["subject"].isin(val_subjects)], "val": pool[pool["subject"].isin(val_subjects)]}


def _pick_subjects(
    pool: pd.DataFrame, fraction: float | dict[str, float], min_images: int, rng: np.random.Generator, split: str
) -> tuple[set[str], list[str]]:
    """Whole subjects holding about ``fraction`` of each class's images, and a note per shortfall.

    Real subjects differ in size by orders of magnitude (2 to 757 cells), so counting subjects
    can hand one split a third of a class's images and another almost none. Per class, a seeded
    search over random subject orders takes the prefix whose image share is closest to
    ``fraction``, preferring any prefix that holds at least ``min_images`` images (within twice
    the share); at least one subject of each class always stays in training.
    """
    subject_label = pool.groupby("subject")["label"].agg(lambda s: s.mode().iat[0])
    sizes = pool.groupby("subject").size()
    picked: set[str] = set()
    notes: list[str] = []
    for label in LABELS:
        share = fraction[label] if isinstance(fraction, dict) else fraction
        counts = sizes[subject_label[subject_label == label].index].sort_index()
        chosen = _closest_prefix(counts, share, min_images, rng)
        picked.update(chosen)
        held = int(counts[list(chosen)].sum())
        if held < min_images:
            notes.append(_shortfall(split, label, held, min_images, counts))
            log.warning("%s", notes[-1])
    return picked, notes


def _closest_prefix(counts: pd.Series, share: float, min_images: int, rng: np.random.Generator) -> list[str]:
    """Subjects (index of ``counts``) of the best prefix over seeded random orders (see _pick_subjects)."""
    n = len(counts)
    if n < 2:
        return []
    sizes = counts.to_numpy()
    orders = np.stack([rng.permutation(n) for _ in range(max(16, min(SEARCH_ORDERS, SEARCH_BUDGET // n)))])
    prefix = np.cumsum(sizes[orders], axis=1)[:, :-1]  # the last subject always stays in training
    achieved = prefix / sizes.sum()
    # Reaching the minimum outweighs any distance, but not at the price of more than twice the share
    # asked for (at most half the class), which would starve training instead.
    too_big = achieved > max(share, min(2 * share, MAX_HELD_OUT_SHARE))
    score = np.abs(achieved - share) + np.where(too_big, 2.0, prefix < min_images)
    row, length = np.unravel_index(np.argmin(score), score.shape)
    return list(counts.index[orders[row, : length + 1]])


def _shortfall(split: str, label: str, held: int, min_images: int, counts: pd.Series) -> str:
    why = (
        "only one subject has that class, and it stays in training"
        if len(counts) < 2
        else f"the pool holds {int(counts.sum())} in {len(counts)} subjects"
    )
    return (
        f"split '{split}': class '{label}' gets {held} images, below split.min_images_per_class = {min_images} ({why})"
    )


def _paper_split(labelled: pd.DataFrame, cfg: SplitConfig, seed: int) -> tuple[dict, list[str]]:
    labelled = labelled.sort_values("path").reset_index(drop=True)
    stratify_ok = labelled["label"].value_counts().min() >= 2
    if not stratify_ok:
        raise CnmcError("protocol 'paper' needs at least 2 images of each class to stratify")
    rest, test = train_test_split(labelled, test_size=cfg.test_fraction, stratify=labelled["label"], random_state=seed)
    train, val = train_test_split(rest, test_size=cfg.val_fraction, stratify=rest["label"], random_state=seed)
    notes = [
        "protocol 'paper': training folds + labelled preliminary set merged, stratified "
        f"{1 - cfg.test_fraction:.0%}/{cfg.test_fraction:.0%} train/test at cell level (Ahmed et al. 2025)",
        "cells of one subject can be in train and test: scores are optimistic (subject leakage)",
        "the paper names no validation set (its early stopping probably watched the test set); "
        f"ours is a stratified {cfg.val_fraction:.0%} of the training part",
    ]
    return {"train": train, "val": val, "test": test}, notes


def _report(
    tables: dict[str, pd.DataFrame], cfg: SplitConfig, seed: int, notes: list[str], unlabelled: int
) -> dict[str, Any]:
    crossfit = cross_fitted(tables["train"])
    # Cross-fitted, train and val list the same people by design: what must stay apart are the folds and test.
    pairs = (("train", "test"), ("val", "test")) if crossfit else (("train", "val"), ("train", "test"), ("val", "test"))
    subjects = {name: set(t["subject"]) for name, t in tables.items()}
    overlap = sorted(set.union(*(subjects[a] & subjects[b] for a, b in pairs)))
    hashes = {name: set(t["sha256"]) for name, t in tables.items()}
    dup_across = sorted(set.union(*(hashes[a] & hashes[b] for a, b in pairs)))
    if dup_across:
        log.warning("%d identical images (same sha256) are in train and val/test", len(dup_across))
    pictures = {name: set(t.get("content_group", pd.Series(dtype=str))) - {""} for name, t in tables.items()}
    pictures_across = sorted(set.union(*(pictures[a] & pictures[b] for a, b in pairs)))
    class_totals = {lab: sum(int((t["label"] == lab).sum()) for t in tables.values()) for lab in LABELS}
    report: dict[str, Any] = {
        "protocol": cfg.protocol,
        "seed": seed,
        "config": cfg.model_dump(),
        "splits": {
            name: {
                "images": len(t),
                "images_per_class": {lab: int((t["label"] == lab).sum()) for lab in LABELS},
                "subjects": t["subject"].nunique(),
                "subjects_per_class": {lab: int(t.loc[t["label"] == lab, "subject"].nunique()) for lab in LABELS},
                "share_of_class": {
                    lab: round(int((t["label"] == lab).sum()) / class_totals[lab], 4) if class_totals[lab] else 0.0
                    for lab in LABELS
                },
            }
            for name, t in tables.items()
        },
        "validation": "crossfit" if crossfit else "holdout",
        "folds": _fold_report(tables["train"]) if crossfit else [],
        "subject_disjoint": not overlap,
        "subject_overlap": overlap if cfg.protocol == "subject" else [],
        "subjects_shared_between_splits": len(overlap),
        "identical_images_across_splits": len(dup_across),
        "shared_pictures_across_splits": len(pictures_across),
        "unlabelled_images_left_out": unlabelled,
        "notes": notes,
    }
    if cfg.protocol == "paper":
        report["paper_reported_counts"] = PAPER_COUNTS
        report["ours_counts"] = {
            "train_plus_val": {
                lab: int((tables["train"]["label"] == lab).sum() + (tables["val"]["label"] == lab).sum())
                for lab in LABELS
            },
            "test": report["splits"]["test"]["images_per_class"],
        }
    return report


def _fold_report(train: pd.DataFrame) -> list[dict[str, Any]]:
    """People and cells of each class in each cross-fitting fold."""
    return [
        {
            "fold": int(k),
            "people_per_class": {lab: int(t.loc[t["label"] == lab, "subject"].nunique()) for lab in LABELS},
            "images_per_class": {lab: int((t["label"] == lab).sum()) for lab in LABELS},
        }
        for k, t in train.groupby(FOLD_COLUMN)
    ]
