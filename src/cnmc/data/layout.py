"""Find the C-NMC data under a folder and read what its file names say.

Three layouts are recognised, searched a few levels below the folder the user names (the
closest wins), so both ``data/`` and ``data/C-NMC_Leukemia`` work:

* ``kaggle``: ``training_data/fold_N/{all,hem}``, ``validation_data/C-NMC_test_prelim_phase_data``
  (labels CSV beside it), ``testing_data/C-NMC_test_final_phase_data``;
* ``tcia``: ``C-NMC_training_data/fold_N/{all,hem}``, ``C-NMC_test_prelim_phase_data`` (labels
  CSV inside it), ``C-NMC_test_final_phase_data``;
* ``folder``: any folder holding ``all/`` and ``hem/`` class folders (a single fold folder too).

Real copies are untidy, so folder names match case-insensitively and a folder nested in a
namesake (``fold_0/fold_0/all``, as in some Kaggle mirrors) is stepped through. Symbolic links
to folders are never followed below the folder the user names (:func:`walk_files` says why).
This module only looks at names and folders; reading pixels and labels is
:mod:`cnmc.data.manifest`'s job.
"""

from __future__ import annotations

import os
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from cnmc.core.errors import CnmcError
from cnmc.data.images import IMAGE_EXTENSIONS

CLASSES = ("all", "hem")
FOLDS = ("fold_0", "fold_1", "fold_2")
LABELS_CSV = "C-NMC_test_prelim_phase_data_labels.csv"
# How many folder levels below DATA_DIR a layout's root may sit.
SEARCH_DEPTH = 3

NAME_PATTERN = "UID_<subject>_<image>_<cell>_<all|hem>"

_CELL_NAME = re.compile(r"UID_(H?)(\d+)_(\d+)_(\d+)_(all|hem)", re.IGNORECASE)
_FOLD = re.compile(r"fold_?(\d+)", re.IGNORECASE)


@dataclass(frozen=True)
class CellName:
    """What a C-NMC file name ``UID_<subject>_<image>_<cell>_<class>`` says about its cell."""

    subject: str  # "11" (an ALL patient) or "H11" (a healthy donor): two different people
    image: int
    cell: int
    label: str  # "all" or "hem"

    @property
    def hem_subject(self) -> bool:
        """C-NMC marks every healthy (Hem) donor with an ``H`` prefix."""
        return self.subject.startswith("H")


def parse_cell_name(name: str) -> CellName | None:
    """Parse a C-NMC cell file name (with or without an image extension), or None.

    Tolerates case (``uid_h11_1_2_ALL.BMP`` is subject ``H11``, class ``all``) and surrounding
    spaces, nothing else: a name that only half matches is not trusted. One person has one name:
    the subject id is normalised (Unicode NFKC, so full-width ``１１`` is ``11``; leading zeros
    dropped, so ``011`` is ``11``), so that no split can put one person on both sides under two
    spellings (the manifest reports the spellings it merged: :func:`subject_spelling`).
    """
    name = unicodedata.normalize("NFKC", name).strip()
    stem, dot, extension = name.rpartition(".")
    if not dot or f".{extension.lower()}" not in IMAGE_EXTENSIONS:
        stem = name
    match = _CELL_NAME.fullmatch(stem)
    if match is None:
        return None
    prefix, number, image, cell, label = match.groups()
    return CellName(subject=prefix.upper() + str(int(number)), image=int(image), cell=int(cell), label=label.lower())


def subject_spelling(name: str) -> str | None:
    """The subject as a C-NMC file name writes it, before normalisation (``011`` in ``UID_011_...``)."""
    match = _CELL_NAME.match(name.strip())
    return f"{match[1]}{match[2]}" if match else None


@dataclass(frozen=True)
class Group:
    """A folder whose images share a source and, for class folders, a label."""

    directory: Path
    source: str  # fold_0, fold_1, fold_2, prelim, final or folder
    label: str  # "all"/"hem" from a class folder; "" where the folder does not say


@dataclass(frozen=True)
class Layout:
    """A recognised data set: its kind, root folder, image folders and prelim labels CSV."""

    kind: str  # kaggle, tcia or folder
    root: Path
    groups: tuple[Group, ...]
    labels_csv: Path | None  # None when absent, even if a prelim folder exists

    @property
    def prelim_dir(self) -> Path | None:
        return next((g.directory for g in self.groups if g.source == "prelim"), None)


@dataclass(frozen=True)
class _Spec:
    """Where a C-NMC distribution keeps its three parts, relative to its root."""

    kind: str
    training: str
    prelim: tuple[str, ...]
    final: tuple[str, ...]

    @property
    def markers(self) -> tuple[str, ...]:
        return (self.training, self.prelim[0], self.final[0])


_KAGGLE = _Spec(
    "kaggle",
    "training_data",
    ("validation_data", "C-NMC_test_prelim_phase_data"),
    ("testing_data", "C-NMC_test_final_phase_data"),
)
_TCIA = _Spec(
    "tcia",
    "C-NMC_training_data",
    ("C-NMC_test_prelim_phase_data",),
    ("C-NMC_test_final_phase_data",),
)

EXPECTED = (
    "Kaggle (C-NMC_Leukemia/training_data/fold_N/{all,hem}, validation_data/, testing_data/), "
    "TCIA (C-NMC_training_data/fold_N/{all,hem}, C-NMC_test_prelim_phase_data/, "
    "C-NMC_test_final_phase_data/) or class folders (<root>/all/, <root>/hem/)"
)


def detect_layout(data_dir: Path) -> Layout:
    """The one layout found closest below ``data_dir``; a :class:`CnmcError` if none or several."""
    if not data_dir.exists():
        raise CnmcError(f"data folder {data_dir} does not exist")
    if not data_dir.is_dir():
        raise CnmcError(f"data folder {data_dir} is not a folder")
    level = [data_dir]
    searched: list[Path] = []
    for _ in range(SEARCH_DEPTH + 1):
        found = [layout for folder in level if (layout := _layout_at(folder)) is not None]
        if len(found) > 1:
            roots = "; ".join(f"{x.root} ({x.kind})" for x in found)
            raise CnmcError(f"several data sets found under {data_dir}: {roots}; point at one of them")
        if found:
            return found[0]
        searched += level
        level = [sub for folder in level for sub in _subdirs(folder)]
    raise CnmcError(
        f"no C-NMC data found in {data_dir} (searched {SEARCH_DEPTH} levels down); "
        f"expected {EXPECTED}{_link_hint(searched)}"
    )


def _link_hint(searched: list[Path]) -> str:
    """Where the data may be hiding behind a link to a folder, which the search did not follow."""
    link = next((sub for folder in searched for sub in _entries(folder) if _is_folder_link(sub)), None)
    if link is None:
        return ""
    return f"; {link} is a symbolic link to a folder, which is not followed: name the folder it leads to"


def _layout_at(folder: Path) -> Layout | None:
    """The layout whose root is exactly ``folder``, if any: a C-NMC distribution, a training
    folder of folds (``training_data/``, every fold taken: kind ``folds``), or class folders."""
    for spec in (_KAGGLE, _TCIA):
        if any(_child(folder, name) for name in spec.markers):
            return _cnmc_layout(folder, spec)
    if folds := _fold_groups(folder):
        return Layout("folds", folder, tuple(folds), labels_csv=None)
    classes = _class_groups(folder, source="folder")
    if {g.label for g in classes} == set(CLASSES):
        return Layout("folder", folder, classes, labels_csv=None)
    return None


def _fold_groups(training: Path) -> list[Group]:
    """The class folders of every C-NMC fold (``fold_0`` ...) directly inside ``training``."""
    groups: list[Group] = []
    for fold in _subdirs(training):
        match = _FOLD.fullmatch(fold.name)
        if match and f"fold_{int(match[1])}" in FOLDS:
            groups += _class_groups(_unnest(fold), source=f"fold_{int(match[1])}")
    return groups


def _cnmc_layout(root: Path, spec: _Spec) -> Layout:
    training = _find(root, (spec.training,))
    groups = _fold_groups(training) if training else []
    prelim = _find(root, spec.prelim)
    final = _find(root, spec.final)
    if prelim:
        groups.append(Group(prelim, "prelim", ""))
    if final:
        groups.append(Group(final, "final", ""))
    return Layout(spec.kind, root, tuple(groups), labels_csv_for(prelim) if prelim else None)


def labels_csv_for(prelim: Path) -> Path | None:
    """The labels CSV: inside the prelim folder (TCIA) or beside it (Kaggle), wherever it is."""
    places = [prelim]
    while places[-1].parent.name.lower() == prelim.name.lower():
        places.append(places[-1].parent)
    places.append(places[-1].parent)
    for place in places:
        for path in sorted(place.iterdir()):
            if path.is_file() and path.name.lower() == LABELS_CSV.lower():
                return path
    return None


def _class_groups(folder: Path, source: str) -> tuple[Group, ...]:
    return tuple(Group(sub, source, sub.name.lower()) for sub in _subdirs(folder) if sub.name.lower() in CLASSES)


def _find(root: Path, names: tuple[str, ...]) -> Path | None:
    """Follow ``names`` down from ``root`` case-insensitively, stepping through namesake nesting."""
    folder: Path | None = root
    for name in names:
        folder = _child(folder, name) if folder else None
        folder = _unnest(folder) if folder else None
    return folder


def _unnest(folder: Path) -> Path:
    """``fold_0/fold_0`` -> the inner one: some mirrors wrap a folder in its namesake."""
    while (inner := _child(folder, folder.name)) is not None:
        folder = inner
    return folder


def _child(folder: Path, name: str) -> Path | None:
    return next((sub for sub in _subdirs(folder) if sub.name.lower() == name.lower()), None)


def _subdirs(folder: Path) -> list[Path]:
    """Visible subfolders in name order, links to folders left out (see :func:`walk_files`);
    macOS/hidden folders never hold data."""
    return [e for e in _entries(folder) if e.is_dir() and not e.is_symlink() and not is_hidden(e.name)]


def _entries(folder: Path) -> list[Path]:
    """What ``folder`` holds, in name order; nothing where it cannot be listed."""
    try:
        return sorted(folder.iterdir())
    except OSError:
        return []


def _is_folder_link(path: Path) -> bool:
    return path.is_symlink() and path.is_dir()


def walk_files(root: Path, skip_hidden: bool) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Every entry below ``root`` that is not a folder, in path order: files, links to files,
    broken links, FIFOs, sockets, devices (what they are is for the reader to find out); and
    each folder not searched, with the one-line reason.

    Links to folders are never followed: one to ``.`` or ``..`` would list the same images
    over and over (two of them, endlessly), and one into the other class folder would give
    its cells this folder's label. A folder reached twice anyway (a bind mount) is searched once.
    ``skip_hidden`` leaves out hidden and ``__MACOSX`` folders (:func:`is_hidden`).
    """
    files: list[Path] = []
    unsearched: list[tuple[Path, str]] = []
    searched: set[tuple[int, int]] = set()
    pending = [root]
    while pending:
        folder = pending.pop()
        try:
            status = os.stat(folder)
            if (status.st_dev, status.st_ino) in searched:
                unsearched.append((folder, "folder already searched (reached again through a mount)"))
                continue
            searched.add((status.st_dev, status.st_ino))
            with os.scandir(folder) as scan:
                entries = sorted(scan, key=lambda entry: entry.name)
        except OSError as exc:
            unsearched.append((folder, f"cannot list the folder ({exc.strerror or exc.__class__.__name__})"))
            continue
        for entry in entries:
            path = folder / entry.name
            if not _leads_to_folder(entry):
                files.append(path)
            elif reason := _not_searched(entry, skip_hidden):
                unsearched.append((path, reason))
            else:
                pending.append(path)
    return sorted(files, key=Path.as_posix), sorted(unsearched, key=lambda item: item[0].as_posix())


def _leads_to_folder(entry: os.DirEntry[str]) -> bool:
    """``entry.is_dir()``, but False for a link loop, where ``is_dir`` raises: it is a file entry."""
    try:
        return entry.is_dir()
    except OSError:
        return False


def _not_searched(entry: os.DirEntry[str], skip_hidden: bool) -> str | None:
    """Why :func:`walk_files` does not enter the folder (or link to one) ``entry``, or None."""
    if skip_hidden and is_hidden(entry.name):
        return "hidden or system folder, not searched"
    if entry.is_symlink():
        return "symbolic link to a folder (not followed)"
    return None


def is_hidden(name: str) -> bool:
    """Dot files and folders (``.DS_Store``, AppleDouble ``._x.bmp``), ``__MACOSX``: never data."""
    return name.startswith(".") or name.lower() == "__macosx"
