"""The ``manifest`` stage: every usable image of the raw data, checked, hashed, labelled.

Every file below the layout's root is accounted for: it becomes a manifest row, or it is
excluded with a reason in the data report. Bad files never stop the stage; only a data set
with nothing usable, or a missing or malformed preliminary-phase labels CSV, does.

Links and special files: links to folders are not followed (reported); a link to a file is
listed only where its target lies in the link's own image folder, since the label comes from
the link's place; a file reached twice (a link to a listed file, a hard link) is listed once;
only regular files are opened (FIFOs, sockets and devices are reported, never read).

Label policy: a cell's label comes from its class folder (training folds, class folders) or
from the labels CSV (preliminary set). Where the file name also states a class, name and
folder/CSV must agree, and the subject must agree with both: C-NMC gives every healthy donor
an ``H`` prefix, so an ``H`` subject labelled ALL, or a plain subject labelled Hem, is a
contradiction nobody can resolve here, and the file is excluded with the reason.

Subjects: parsed from the C-NMC name (the CSV's original name for renamed prelim cells).
Training-fold cells must have one, since subject-disjoint splits depend on it. Elsewhere
(class folders, the unlabelled final set) an image without a parsable name is its own
subject, ``img:<path below the root, without extension>``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from tqdm import tqdm

from cnmc.core.atomic import atomic_write_text
from cnmc.core.errors import CnmcError
from cnmc.core.names import name_problem, shown
from cnmc.data.images import ImageProblem, open_rgb, read_image_file
from cnmc.data.layout import (
    CLASSES,
    FOLDS,
    IMAGE_EXTENSIONS,
    LABELS_CSV,
    NAME_PATTERN,
    CellName,
    Group,
    Layout,
    detect_layout,
    is_hidden,
    parse_cell_name,
    subject_spelling,
    walk_files,
)

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = (
    "path",
    "label",
    "subject",
    "source",
    "sha256",
    "width",
    "height",
    "original_mode",
    "original_name",
    "content_group",
)
SOURCES = (*FOLDS, "prelim", "final", "folder")
LABEL_COLUMNS = ("Patient_ID", "new_names", "labels")
SYSTEM_FILES = ("thumbs.db", "desktop.ini")
# Below this many images, starting worker processes costs more than it saves.
PARALLEL_MIN = 64
# Leaking duplicate groups logged one by one; the rest are counted (all are in the report).
LOGGED_LEAKS = 5
# Two images are one picture when their 32x32 grey thumbnails differ by less than this RMS (grey
# levels). On cnmc-real: a JPEG copy at quality 75 differs by 0.3, the same picture filed under two
# normal donors by 0.04-0.08, the same cell in the next frame of one person by 0.6-1.4, other cells by more.
THUMBNAIL_SIDE = 32
SAME_PICTURE_RMS = 0.5


@dataclass(frozen=True)
class Candidate:
    """A file whose place and name make it a manifest row, if its pixels decode."""

    path: Path
    label: str
    subject: str
    source: str
    original_name: str


@dataclass(frozen=True)
class Exclusion:
    path: str
    reason: str


@dataclass(frozen=True)
class Conversion:
    path: str
    from_mode: str


@dataclass(frozen=True)
class ImageCheck:
    """What reading and decoding one file found: hash, size and thumbnail, or the problem."""

    sha256: str = ""
    width: int = 0
    height: int = 0
    mode: str = ""
    problem: str = ""
    thumbnail: bytes = b""  # THUMBNAIL_SIDE^2 grey levels: near-identical pictures are found by them


@dataclass(frozen=True)
class PrelimLabel:
    """One row of the preliminary-phase labels CSV."""

    original_name: str  # Patient_ID: the cell's file name before the renaming
    label: str


@dataclass(frozen=True)
class DuplicateGroup:
    """One picture in several files (the same bytes, or re-encoded: near-identical thumbnails);
    across subjects or sources they would leak between splits, so the split keeps a group together."""

    sha256: str  # of the group's first file: the group's key (``content_group`` in the manifest)
    paths: tuple[str, ...]
    subjects: tuple[str, ...]
    sources: tuple[str, ...]
    labels: tuple[str, ...]
    identical_bytes: bool = True  # every file the same bytes (else re-encoded copies)

    @property
    def leaks(self) -> bool:
        return bool(self.crossings())

    def crossings(self) -> str:
        """Which of subject, source and label differ within the group, e.g. ``subjects 1, 4``."""
        labels = tuple(label or "unlabelled" for label in self.labels)
        kinds = (("subjects", self.subjects), ("sources", self.sources), ("labels", labels))
        return "; ".join(f"{kind} {_brief(values)}" for kind, values in kinds if len(values) > 1)

    def to_dict(self) -> dict[str, Any]:
        return {
            "sha256": self.sha256,
            "paths": list(self.paths),
            "subjects": list(self.subjects),
            "sources": list(self.sources),
            "labels": list(self.labels),
            "identical_bytes": self.identical_bytes,
            "crosses_subjects": len(self.subjects) > 1,
            "crosses_sources": len(self.sources) > 1,
            "crosses_labels": len(self.labels) > 1,
        }


@dataclass(frozen=True, eq=False)
class Manifest:
    """The manifest table plus everything the data report says about how it was made."""

    table: pd.DataFrame
    data_dir: Path
    layout: Layout
    converted: tuple[Conversion, ...]
    excluded: tuple[Exclusion, ...]
    duplicates: tuple[DuplicateGroup, ...]
    thumbnails: np.ndarray | None = None  # one THUMBNAIL_SIDE^2 row per table row (not written)

    def counts(self) -> dict[str, dict[str, int]]:
        """Images per source and label (``unlabelled`` for the final set)."""
        sizes = self.table.groupby(["source", "label"]).size()
        out: dict[str, dict[str, int]] = {}
        for (source, label), n in sorted(sizes.items(), key=lambda kv: SOURCES.index(kv[0][0])):
            out.setdefault(source, {})[label or "unlabelled"] = int(n)
        return out

    def subjects(self, label: str) -> list[str]:
        ids = self.table.loc[self.table["label"] == label, "subject"].unique()
        return sorted(ids, key=natural_key)

    def spellings(self) -> dict[str, list[str]]:
        """Subjects whose file names write them in more than one way (``11``, ``011``, ``１１``):
        one person, merged under one normalised id (:func:`cnmc.data.layout.parse_cell_name`)."""
        seen: dict[str, set[str]] = {}
        for subject, name in zip(self.table["subject"], self.table["original_name"], strict=True):
            if (spelled := subject_spelling(str(name))) is not None:
                seen.setdefault(subject, set()).add(spelled)
        return {subject: sorted(names) for subject, names in sorted(seen.items()) if len(names) > 1}

    def report(self) -> dict[str, Any]:
        labels = self.table["label"]
        subjects = {label: self.subjects(label) for label in CLASSES}
        return {
            "data_dir": self.data_dir.as_posix(),
            "layout": self.layout.kind,
            "root": self.layout.root.as_posix(),
            "totals": {
                "images": len(self.table),
                "all": int((labels == "all").sum()),
                "hem": int((labels == "hem").sum()),
                "unlabelled": int((labels == "").sum()),
                "subjects": self.table.loc[labels != "", "subject"].nunique(),
                "converted": len(self.converted),
                "excluded": len(self.excluded),
                "duplicate_groups": len(self.duplicates),
                "leaking_duplicate_groups": sum(g.leaks for g in self.duplicates),
                "subjects_spelled_several_ways": len(self.spellings()),
            },
            "counts": self.counts(),
            "subjects": {label: {"count": len(ids), "ids": ids} for label, ids in subjects.items()},
            "converted": [{"path": c.path, "from_mode": c.from_mode} for c in self.converted],
            "excluded": [{"path": e.path, "reason": e.reason} for e in self.excluded],
            "duplicates": [g.to_dict() for g in self.duplicates],
            "subject_spellings": self.spellings(),
        }

    def summary_line(self, report_path: Path | str | None = None) -> str:
        totals = self.report()["totals"]
        parts = [f"{totals['all']:,} all", f"{totals['hem']:,} hem"]
        if totals["unlabelled"]:
            parts.append(f"{totals['unlabelled']:,} unlabelled")
        see = f"see {Path(report_path).as_posix()}" if report_path else "see the data report"
        return (
            f"manifest: {_count(totals['images'], 'image')} ({', '.join(parts)}) "
            f"from {_count(totals['subjects'], 'subject')}, layout {self.layout.kind}; "
            f"{totals['converted']:,} converted, {totals['excluded']:,} excluded ({see}), "
            f"{_count(totals['duplicate_groups'], 'duplicate group')}"
            + (
                f", {_count(totals['subjects_spelled_several_ways'], 'subject')} written several ways (merged)"
                if totals["subjects_spelled_several_ways"]
                else ""
            )
        )


def build_manifest(data_dir: Path | str, progress: bool = False, workers: int | None = None) -> Manifest:
    """Find the layout under ``data_dir``, check every image (on ``workers`` processes, default
    all cores) and assemble the manifest. The result does not depend on ``workers``."""
    data_dir = Path(data_dir)
    layout = detect_layout(data_dir)
    log.info("found the %s layout at %s", layout.kind, layout.root)
    candidates, excluded = plan_files(layout)
    checks = check_images([c.path for c in candidates], workers or os.cpu_count() or 1, progress)
    rows, converted, thumbnails = [], [], []
    for candidate, check in zip(candidates, checks, strict=True):
        path = candidate.path.as_posix()
        if check.problem:
            excluded.append(Exclusion(path, check.problem))
            continue
        rows.append(_row(candidate, check))
        thumbnails.append(np.frombuffer(check.thumbnail, dtype=np.uint8))
        if check.mode != "RGB":
            converted.append(Conversion(path, check.mode))
    excluded.sort(key=lambda e: e.path)
    if not rows:
        raise CnmcError(_nothing_usable(data_dir, excluded))
    table = pd.DataFrame(rows, columns=list(MANIFEST_COLUMNS))
    stacked = np.stack(thumbnails)
    table["content_group"] = same_pictures(table, stacked)
    duplicates = find_duplicates(table)
    _warn_leaks(duplicates)
    return Manifest(table, data_dir, layout, tuple(converted), tuple(excluded), duplicates, stacked)


def shared_pictures(first: Manifest, second: Manifest) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The two manifests' tables with ``content_group`` computed over both together, so that a
    picture in a training folder and again in a separate test folder is one group (the split then
    keeps the people who share it out of training). Warns for each such picture."""
    both = pd.concat([first.table, second.table], ignore_index=True)
    if first.thumbnails is None or second.thumbnails is None:
        raise ValueError("shared_pictures needs manifests built here (build_manifest keeps their thumbnails)")
    thumbnails = np.concatenate([first.thumbnails, second.thumbnails])
    groups = same_pictures(both, thumbnails)
    a = first.table.assign(content_group=groups[: len(first.table)])
    b = second.table.assign(content_group=groups[len(first.table) :])
    across = sorted(set(a["content_group"]) & set(b["content_group"]) - {""})
    if across:
        log.warning(
            "%d picture(s) are in both the training and the test folder (the same image, or a re-encoded copy): "
            "the people who share them are kept out of training",
            len(across),
        )
    return a, b


def plan_files(layout: Layout) -> tuple[list[Candidate], list[Exclusion]]:
    """Decide from names and places alone (no pixels read) what each file under the root is."""
    labels = prelim_labels(layout)
    groups = {g.directory: g for g in layout.groups}
    files, excluded = _files(layout.root)
    candidates: list[Candidate] = []
    prelim_names: set[str] = set()
    for path in files:
        if path == layout.labels_csv:
            continue
        group = next((groups[p] for p in path.parents if p in groups), None)
        if group is not None and group.source == "prelim":
            prelim_names.add(path.name.lower())
        outcome = _plan_file(path, group, layout.root, labels)
        if isinstance(outcome, Candidate):
            candidates.append(outcome)
        else:
            excluded.append(outcome)
    excluded += _missing_prelim(layout, labels, prelim_names)
    candidates, repeated = _list_once(candidates)
    return candidates, excluded + repeated


def prelim_labels(layout: Layout) -> dict[str, PrelimLabel]:
    """The prelim labels by lower-case new name; {} without a prelim folder."""
    if layout.prelim_dir is None:
        return {}
    if layout.labels_csv is None:
        raise CnmcError(
            f"{layout.prelim_dir}: labels CSV {LABELS_CSV} not found inside or beside this folder; "
            "the preliminary-phase images cannot be labelled without it"
        )
    return read_prelim_labels(layout.labels_csv)


def read_prelim_labels(csv_path: Path) -> dict[str, PrelimLabel]:
    """Read and validate the labels CSV (``Patient_ID,new_names,labels``; 1 = ALL, 0 = Hem)."""
    try:
        table = pd.read_csv(csv_path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise CnmcError(f"{csv_path}: not a readable labels CSV ({exc.__class__.__name__})") from None
    table.columns = [str(c).strip() for c in table.columns]
    if not set(LABEL_COLUMNS) <= set(table.columns):
        raise CnmcError(f"{csv_path}: expected columns {','.join(LABEL_COLUMNS)}, found {','.join(table.columns)}")
    table = table[list(LABEL_COLUMNS)].apply(lambda column: column.str.strip())
    _validate_prelim_labels(table, csv_path)
    return {
        new.lower(): PrelimLabel(original, "all" if label == "1" else "hem")
        for original, new, label in table.itertuples(index=False)
    }


def _validate_prelim_labels(table: pd.DataFrame, csv_path: Path) -> None:
    if table.empty:
        raise CnmcError(f"{csv_path}: the labels CSV has no rows")
    for column in LABEL_COLUMNS:
        empty = table.index[table[column] == ""]
        if len(empty):
            raise CnmcError(f"{csv_path}: row {empty[0] + 2} has no {column}")
    bad = table[~table["labels"].isin(["0", "1"])]
    if len(bad):
        raise CnmcError(
            f"{csv_path}: labels must be 1 (ALL) or 0 (Hem); row {bad.index[0] + 2} has {bad['labels'].iloc[0]!r}"
        )
    for column in ("new_names", "Patient_ID"):
        repeated = table.loc[table[column].str.lower().duplicated(keep=False), column]
        if len(repeated):
            raise CnmcError(f"{csv_path}: duplicate {column}: {', '.join(sorted(set(repeated))[:3])}")


def _files(root: Path) -> tuple[list[Path], list[Exclusion]]:
    """All files below ``root`` in path order, and the folders not searched (hidden and
    ``__MACOSX`` folders, links to folders) as exclusions."""
    files, unsearched = walk_files(root, skip_hidden=True)
    return files, [Exclusion(f"{shown(folder.as_posix())}/", reason) for folder, reason in unsearched]


def _plan_file(path: Path, group: Group | None, root: Path, labels: dict[str, PrelimLabel]) -> Candidate | Exclusion:
    name = path.name
    if problem := name_problem(path):  # it could not be written to the manifest and read back
        return Exclusion(shown(path.as_posix()), f"{problem}: rename it")
    if is_hidden(name) or name.lower() in SYSTEM_FILES:
        return Exclusion(path.as_posix(), "hidden or system file")
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        return Exclusion(path.as_posix(), f"not an image file type ({path.suffix or 'no extension'})")
    if group is None:
        return Exclusion(path.as_posix(), "outside the recognised image folders")
    link = _link_out_of(path, group)
    if link:
        return Exclusion(path.as_posix(), link)
    if group.source == "prelim":
        return _plan_prelim(path, labels)
    cell = parse_cell_name(name)
    if cell is None and group.source in FOLDS:
        return Exclusion(path.as_posix(), f"file name does not match {NAME_PATTERN}")
    if cell is None:
        subject = "img:" + path.relative_to(root).with_suffix("").as_posix()
        return Candidate(path, group.label, subject, group.source, name)
    where = f"its folder {group.directory.name}/"
    conflict = _label_conflict(cell, group.label, where) if group.label else None
    if conflict:
        return Exclusion(path.as_posix(), conflict)
    return Candidate(path, group.label, cell.subject, group.source, name)


def _link_out_of(path: Path, group: Group) -> str | None:
    """Why the link ``path`` may not give its target ``group``'s label, or None.

    The label (and for prelim cells the CSV row) comes from where the link is; a target in
    another folder has its own, possibly different, label there or none known at all.
    """
    if not path.is_symlink():
        return None
    target = Path(os.path.realpath(path))
    if Path(os.path.realpath(group.directory)) in target.parents:
        return None
    return f"symbolic link to {target.as_posix()}, outside its folder {group.directory.name}/ (not followed)"


def _list_once(candidates: list[Candidate]) -> tuple[list[Candidate], list[Exclusion]]:
    """One row per file: a link to a listed file, or a hard link, would count one cell twice.

    Files that are not links come first, each in path order, so the file itself keeps its row.
    A path that cannot be followed is kept: reading it reports why.
    """
    first: dict[tuple[int, int], Path] = {}
    kept: list[Candidate] = []
    repeated: list[Exclusion] = []
    for candidate in sorted(candidates, key=lambda c: (c.path.is_symlink(), c.path.as_posix())):
        try:
            status = os.stat(candidate.path)
        except OSError:
            kept.append(candidate)
            continue
        same = first.setdefault((status.st_dev, status.st_ino), candidate.path)
        if same == candidate.path:
            kept.append(candidate)
        else:
            repeated.append(Exclusion(candidate.path.as_posix(), f"same file as {same.as_posix()} (listed once)"))
    return sorted(kept, key=lambda c: c.path.as_posix()), repeated


def _plan_prelim(path: Path, labels: dict[str, PrelimLabel]) -> Candidate | Exclusion:
    """A renamed prelim cell: label and subject both come from its row in the labels CSV."""
    entry = labels.get(path.name.lower())
    if entry is None:
        return Exclusion(path.as_posix(), f"not listed in {LABELS_CSV}")
    cell = parse_cell_name(entry.original_name)
    if cell is None:
        return Exclusion(path.as_posix(), f"its Patient_ID {entry.original_name!r} does not match {NAME_PATTERN}")
    conflict = _label_conflict(cell, entry.label, "the labels CSV")
    if conflict:
        return Exclusion(path.as_posix(), f"{conflict} (Patient_ID {entry.original_name})")
    return Candidate(path, entry.label, cell.subject, "prelim", entry.original_name)


def _label_conflict(cell: CellName, label: str, where: str) -> str | None:
    """Why ``cell``'s name contradicts ``label``, or None when name, subject and label agree."""
    if cell.label != label:
        return f"name says {cell.label} but {where} says {label}"
    if cell.hem_subject and label != "hem":
        return f"subject {cell.subject} is a healthy donor (H prefix) but labelled {label}"
    if not cell.hem_subject and label == "hem":
        return f"subject {cell.subject} is an ALL patient (no H prefix) but labelled hem"
    return None


def _missing_prelim(layout: Layout, labels: dict[str, PrelimLabel], seen: set[str]) -> list[Exclusion]:
    """Labels CSV rows without their image."""
    prelim = layout.prelim_dir
    if prelim is None:
        return []
    missing = sorted(set(labels) - seen)
    return [Exclusion((prelim / new).as_posix(), f"listed in {LABELS_CSV} but the file is missing") for new in missing]


def check_image(path: Path) -> ImageCheck:
    """Hash and fully decode one file. Runs in worker processes, so it reports, never raises."""
    try:
        data = read_image_file(path)
    except ImageProblem as exc:
        return ImageCheck(problem=str(exc))
    except OSError as exc:
        return ImageCheck(problem=f"cannot read the file ({exc.strerror or exc.__class__.__name__})")
    digest = hashlib.sha256(data).hexdigest()
    try:
        image, mode = open_rgb(data)
    except ImageProblem as exc:
        return ImageCheck(sha256=digest, problem=str(exc))
    side = (THUMBNAIL_SIDE, THUMBNAIL_SIDE)
    thumbnail = np.asarray(image.convert("L").resize(side, Image.Resampling.BOX), dtype=np.uint8).tobytes()
    return ImageCheck(digest, image.width, image.height, mode, thumbnail=thumbnail)


def check_images(paths: Sequence[Path], workers: int, progress: bool) -> list[ImageCheck]:
    """:func:`check_image` for each path, in order, on up to ``workers`` processes."""
    if workers <= 1 or len(paths) < PARALLEL_MIN:
        return _collect(map(check_image, paths), len(paths), progress)
    chunksize = max(1, min(64, len(paths) // (workers * 8)))
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return _collect(pool.map(check_image, paths, chunksize=chunksize), len(paths), progress)


def _collect(results: Iterable[ImageCheck], total: int, progress: bool) -> list[ImageCheck]:
    return list(tqdm(results, total=total, disable=not progress, desc="checking images", unit="img"))


def _row(candidate: Candidate, check: ImageCheck) -> tuple[object, ...]:
    return (
        candidate.path.as_posix(),
        candidate.label,
        candidate.subject,
        candidate.source,
        check.sha256,
        check.width,
        check.height,
        check.mode,
        candidate.original_name,
        "",  # content_group: filled in once every image is seen
    )


def same_pictures(table: pd.DataFrame, thumbnails: np.ndarray, chunk: int = 2048) -> list[str]:
    """Each row's ``content_group``: the sha256 of the first file (in path order) showing the same
    picture (identical bytes, or thumbnails within :data:`SAME_PICTURE_RMS`), "" for a picture seen once."""
    n = len(table)
    x = thumbnails.astype(np.float32)
    norms = (x * x).sum(axis=1)
    limit = SAME_PICTURE_RMS**2 * x.shape[1]
    pairs_a, pairs_b = [], []
    for start in range(0, n, chunk):
        block = x[start : start + chunk]
        squared = norms[start : start + chunk, None] + norms[None, :] - 2.0 * block @ x.T
        a, b = np.nonzero(squared < limit)
        keep = start + a < b
        pairs_a.append(start + a[keep])
        pairs_b.append(b[keep])
    digests = table["sha256"].to_numpy()
    same_bytes = pd.Series(np.arange(n)).groupby(digests).transform("min").to_numpy()  # identical files pair up
    a = np.concatenate([*pairs_a, np.arange(n)])
    b = np.concatenate([*pairs_b, same_bytes])
    graph = coo_matrix((np.ones(len(a), dtype=np.int8), (a, b)), shape=(n, n))
    _, component = connected_components(graph, directed=False)
    order = np.argsort(table["path"].to_numpy(), kind="stable")
    first: dict[int, str] = {}
    for row in order:
        first.setdefault(int(component[row]), str(digests[row]))
    sizes = np.bincount(component)
    return [first[int(c)] if sizes[c] > 1 else "" for c in component]


def find_duplicates(table: pd.DataFrame) -> tuple[DuplicateGroup, ...]:
    """Groups of rows showing one picture (:func:`same_pictures`), in path order."""
    repeated = table[table["content_group"] != ""]
    groups = [
        DuplicateGroup(
            sha256=str(key),
            paths=tuple(rows["path"]),
            subjects=tuple(sorted(set(rows["subject"]), key=natural_key)),
            sources=tuple(sorted(set(rows["source"]), key=SOURCES.index)),
            labels=tuple(sorted(set(rows["label"]))),
            identical_bytes=rows["sha256"].nunique() == 1,
        )
        for key, rows in repeated.groupby("content_group", sort=False)
    ]
    return tuple(sorted(groups, key=lambda g: g.paths[0]))


def _warn_leaks(duplicates: Iterable[DuplicateGroup]) -> None:
    leaks = [g for g in duplicates if g.leaks]
    for group in leaks[:LOGGED_LEAKS]:
        log.warning(
            "%d identical images across %s (leakage): %s",
            len(group.paths),
            group.crossings(),
            _brief(group.paths),
        )
    if len(leaks) > LOGGED_LEAKS:
        log.warning(
            "%d more duplicate groups cross subjects or sources (see the data report)",
            len(leaks) - LOGGED_LEAKS,
        )


def _brief(items: Sequence[str], limit: int = 3) -> str:
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def _nothing_usable(data_dir: Path, excluded: list[Exclusion]) -> str:
    if not excluded:
        return f"no image files found in the data set under {data_dir}"
    first = excluded[0]
    return (
        f"no usable images under {data_dir}: all {len(excluded):,} files excluded (e.g. {first.path}: {first.reason})"
    )


def natural_key(text: str) -> list[Any]:
    """Sort key putting ``H6`` before ``H11``, for readable subject lists."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def write_manifest(manifest: Manifest, csv_path: Path, report_path: Path) -> None:
    """Write the manifest CSV and the data report JSON, each atomically."""
    atomic_write_text(csv_path, manifest.table.to_csv(index=False, lineterminator="\n"))
    atomic_write_text(report_path, json.dumps(manifest.report(), indent=2) + "\n")


def read_manifest(path: Path) -> pd.DataFrame:
    """Read a manifest written by :func:`write_manifest`: strings ('' stays ''), int sizes."""
    if not path.is_file():
        raise CnmcError(f"{path}: manifest not found (run `cnmc manifest DATA_DIR` first)")
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise CnmcError(f"{path}: not a manifest CSV ({exc.__class__.__name__})") from None
    if tuple(table.columns) != MANIFEST_COLUMNS:
        raise CnmcError(
            f"{path}: not a manifest: expected columns {','.join(MANIFEST_COLUMNS)}, found {','.join(table.columns)}"
        )
    try:
        table[["width", "height"]] = table[["width", "height"]].astype(int)
    except ValueError:
        raise CnmcError(f"{path}: width and height must be whole numbers") from None
    for column, allowed in (("label", ("all", "hem", "")), ("source", SOURCES)):
        bad = table.loc[~table[column].isin(allowed), column]
        if len(bad):
            raise CnmcError(f"{path}: unknown {column} {bad.iloc[0]!r} (expected one of {', '.join(allowed)})")
    return table
