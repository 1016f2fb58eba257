"""The ``augment`` stage: resize every split and balance the training set with the paper's T.

Input: a splits folder (``train.csv``, ``val.csv``, optional ``test.csv``). Output: the image
store (see :mod:`cnmc.data.store`) plus ``augment_report.json`` and a preview grid PNG.

- Every image (all splits) is read with :func:`cnmc.data.images.open_rgb`, cut to the cell's square
  where ``augment.crop`` is ``cell``, and resized to ``image_size`` squared (:func:`cnmc.data.transforms.frame`).
- Training, per class with n originals: all originals are kept when n <= M (else a seeded
  random M of them, with a warning), and M - n augmented images are added, each T(original)
  with sources taken round-robin over a seeded permutation of the class's originals. With
  ``augment.online`` only the originals are stored: training draws T afresh every epoch.
- Augmented image k of class c uses the torch seed derived from (seed, c, k), set right before
  T runs, so the store is byte-identical for a seed whatever the number of worker processes.
- Workers write straight into the output ``.npy`` memmaps; the store is built in a temporary
  folder beside ``out_dir`` and swapped in at the end, so a failure never leaves half a store.
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from cnmc.core.atomic import plain_mode
from cnmc.core.config import SPLITS, AugmentConfig, Framing
from cnmc.core.errors import CnmcError
from cnmc.data.images import ImageProblem, open_rgb
from cnmc.data.manifest import MANIFEST_COLUMNS
from cnmc.data.sampling import resolve_per_class
from cnmc.data.store import IMAGES_FILE, INDEX_FILE, LABELS, REPORT_FILE, TARGETS
from cnmc.data.transforms import frame, paper_transform

log = logging.getLogger(__name__)

OPTIONAL_SPLITS = ("test",)
REQUIRED_COLUMNS = (*MANIFEST_COLUMNS, "split")
STORE_COLUMNS = ("target", "augmented", "origin", "aug_seed")
PREVIEW_AUGMENTATIONS = 5

# Tags that keep the seeded random streams of the stage apart.
_TAG_KEEP, _TAG_ORDER, _TAG_AUG, _TAG_PREVIEW, _TAG_PREVIEW_AUG = 1, 2, 3, 4, 5
_MAX_CHUNK = 32


@dataclass(frozen=True)
class PrepareSummary:
    """What ``prepare_dataset`` wrote; ``str()`` is the one line the CLI prints."""

    out_dir: Path
    image_size: int
    strength: float
    per_class: int  # M as resolved (``auto``: the largest training class)
    split_counts: dict[str, int]
    train_original: dict[str, int]  # originals kept per label
    train_augmented: dict[str, int]  # augmented images added per label
    train_dropped: dict[str, int] = field(default_factory=dict)  # originals left out (n > M)
    workers: int = 1
    seconds: float = 0.0

    def __str__(self) -> str:
        classes = []
        for label in LABELS:
            orig, aug = self.train_original[label], self.train_augmented[label]
            dropped = self.train_dropped.get(label, 0)
            kept = f"{orig} of {orig + dropped} original kept, {dropped} dropped" if dropped else f"{orig} original"
            classes.append(f"{label} {orig + aug} = {kept} + {aug} augmented")
        splits = [f"train {self.split_counts['train']} ({'; '.join(classes)})"]
        splits += [f"{name} {n}" for name, n in self.split_counts.items() if name != "train"]
        return (
            f"augment: {', '.join(splits)}; {self.image_size}x{self.image_size} px, "
            f"strength {self.strength:g}, {self.workers} worker(s), {self.seconds:.1f} s "
            f"-> {self.out_dir}"
        )


def derive_seed(seed: int, target: int, k: int, tag: int = _TAG_AUG) -> int:
    """A 63-bit torch seed for augmented image ``k`` of class ``target`` (stable across runs)."""
    state = np.random.SeedSequence([seed % 2**64, tag, target, k]).generate_state(1, dtype=np.uint64)
    return int(state[0]) >> 1


def _rng(seed: int, tag: int, target: int) -> np.random.Generator:
    return np.random.default_rng([seed % 2**64, tag, target])


def default_workers() -> int:
    """The cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def load_image_tensor(path: Path | str, where: str = "") -> torch.Tensor:
    """Read an image as a uint8 (3, H, W) tensor, or raise :class:`CnmcError` naming the file."""
    suffix = f" (listed in {where})" if where else ""
    try:
        image, _ = open_rgb(path)
    except ImageProblem as exc:
        raise CnmcError(f"{path}: unreadable image: {exc}{suffix}") from None
    except OSError as exc:
        raise CnmcError(f"{path}: cannot read image: {exc.strerror or exc}{suffix}") from None
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)


# --------------------------------------------------------------------------- planning


def _read_split(splits_dir: Path, split: str) -> pd.DataFrame | None:
    path = splits_dir / f"{split}.csv"
    if not path.is_file():
        if split in OPTIONAL_SPLITS:
            return None
        raise CnmcError(f"{path}: split CSV not found (run `cnmc split`)")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise CnmcError(f"{path}: empty file, expected a header with {', '.join(REQUIRED_COLUMNS)}") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise CnmcError(f"{path}: not a readable CSV ({exc.__class__.__name__})") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise CnmcError(f"{path}: missing column(s) {', '.join(missing)}")
    reserved = [c for c in STORE_COLUMNS if c in df.columns]
    if reserved:
        raise CnmcError(f"{path}: column(s) {', '.join(reserved)} are reserved for the image store")
    bad_label = ~df["label"].isin(LABELS)
    if bad_label.any():
        row = int(np.flatnonzero(bad_label.to_numpy())[0])
        raise CnmcError(f"{path}: line {row + 2}: label {df['label'].iloc[row]!r} is not 'all' or 'hem'")
    no_path = df["path"].str.strip() == ""
    if no_path.any():
        row = int(np.flatnonzero(no_path.to_numpy())[0])
        raise CnmcError(f"{path}: line {row + 2}: empty path")
    return df.reset_index(drop=True)


@dataclass
class _SplitPlan:
    name: str
    csv: Path
    index: pd.DataFrame  # the store's index.csv, one row per output image
    sources: list[tuple[int, str, str]]  # (row, image path, where) to read and resize
    augment: list[tuple[int, int, int]]  # (row, origin row, torch seed) to make with T
    counts: dict[str, dict[str, int]]


def _plan_plain(name: str, csv: Path, df: pd.DataFrame) -> _SplitPlan:
    index = df.copy()
    rows = np.arange(len(df))
    index["target"] = df["label"].map(TARGETS).astype(int)
    index["augmented"] = 0
    index["origin"] = rows
    index["aug_seed"] = ""
    sources = [(int(r), p, f"{csv} line {r + 2}") for r, p in zip(rows, df["path"], strict=True)]
    counts = {label: {"original": int((df["label"] == label).sum()), "augmented": 0, "dropped": 0} for label in LABELS}
    return _SplitPlan(name, csv, index, sources, [], counts)


def _plan_train(csv: Path, df: pd.DataFrame, per_class: int, seed: int, online: bool = False) -> _SplitPlan:
    """The training split: originals kept up to M a class, and (offline) M - n augmented images a
    class; ``online`` stores the originals alone, for T to be drawn afresh every epoch."""
    if df.empty:
        raise CnmcError(f"{csv}: the training split has no images")
    keep_mask = np.zeros(len(df), dtype=bool)
    dropped: dict[str, int] = {}
    for label in LABELS:
        rows = np.flatnonzero((df["label"] == label).to_numpy())
        if len(rows) == 0:
            raise CnmcError(f"{csv}: no '{label}' images in the training split, cannot balance the classes")
        if len(rows) > per_class:
            log.warning(
                "%s: %d '%s' training images exceed per_class M=%d: %d originals are DROPPED "
                "(augment.per_class: auto keeps every one)",
                csv,
                len(rows),
                label,
                per_class,
                len(rows) - per_class,
            )
            rows = np.sort(_rng(seed, _TAG_KEEP, TARGETS[label]).choice(rows, size=per_class, replace=False))
        dropped[label] = int((df["label"] == label).sum()) - len(rows)
        keep_mask[rows] = True
    kept = df[keep_mask].reset_index(drop=True)
    plan = _plan_plain("train", csv, kept)
    sources = [
        (r, p, f"{csv} line {int(i) + 2}") for (r, p, _), i in zip(plan.sources, np.flatnonzero(keep_mask), strict=True)
    ]
    aug_rows: list[pd.DataFrame] = []
    augment: list[tuple[int, int, int]] = []
    next_row = len(kept)
    for label in LABELS:
        target = TARGETS[label]
        originals = np.flatnonzero((kept["label"] == label).to_numpy())
        need = 0 if online else per_class - len(originals)
        order = _rng(seed, _TAG_ORDER, target).permutation(originals)
        origins = [int(order[k % len(order)]) for k in range(need)]
        seeds = [derive_seed(seed, target, k) for k in range(need)]
        block = plan.index.iloc[origins].copy()
        block["augmented"] = 1
        block["origin"] = origins
        block["aug_seed"] = [str(s) for s in seeds]
        aug_rows.append(block)
        augment += [(next_row + k, origins[k], seeds[k]) for k in range(need)]
        next_row += need
        plan.counts[label]["augmented"] = need
        plan.counts[label]["dropped"] = dropped[label]
    index = pd.concat([plan.index, *(b for b in aug_rows if len(b))], ignore_index=True)
    for column in ("target", "augmented", "origin"):
        index[column] = index[column].astype(np.int64)
    plan.index = index
    plan.sources = sources
    plan.augment = augment
    return plan


# --------------------------------------------------------------------------- workers


def _worker_init() -> None:
    torch.set_num_threads(1)


def _run_chunk(task: tuple[Any, ...]) -> int:
    """Do one chunk of work, writing straight into the split's ``images.npy`` (opened r+)."""
    kind, npy, size, strength, items = task  # size: the Framing of every stored image
    images = np.lib.format.open_memmap(npy, mode="r+")
    try:
        if kind == "resize":
            for row, path, where in items:
                images[row] = frame(load_image_tensor(path, where), size).permute(1, 2, 0).numpy()
        else:
            transform = paper_transform(size.image_size, strength)
            for row, origin, seed in items:
                source = torch.from_numpy(np.array(images[origin])).permute(2, 0, 1)
                torch.manual_seed(seed)
                images[row] = transform(source).permute(1, 2, 0).numpy()
        images.flush()
    finally:
        del images
    return len(items)


def _chunks(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _run_tasks(phases: list[list[tuple[Any, ...]]], workers: int, bar: tqdm) -> None:
    """Run the phases in order (each phase's tasks in any order), in-process or in a pool."""
    tasks = sum(len(p) for p in phases)
    if workers <= 1 or tasks <= 1:
        threads, rng_state = torch.get_num_threads(), torch.get_rng_state()
        torch.set_num_threads(1)  # one worker = one core, as in the pool
        try:
            for phase in phases:
                for task in phase:
                    bar.update(_run_chunk(task))
        finally:
            torch.set_num_threads(threads)
            torch.set_rng_state(rng_state)
        return
    ctx = multiprocessing.get_context()
    with ctx.Pool(min(workers, max(len(p) for p in phases)), initializer=_worker_init) as pool:
        for phase in phases:
            for done in pool.imap_unordered(_run_chunk, phase):
                bar.update(done)


# --------------------------------------------------------------------------- the stage


def prepare_dataset(
    splits_dir: Path,
    out_dir: Path,
    cfg: AugmentConfig,
    seed: int,
    preview_path: Path,
    progress: bool = True,
) -> PrepareSummary:
    """Build the image store at ``out_dir`` from the split CSVs in ``splits_dir`` (module doc)."""
    started = time.perf_counter()
    splits_dir, out_dir, preview_path = Path(splits_dir), Path(out_dir), Path(preview_path)
    if not splits_dir.is_dir():
        raise CnmcError(f"{splits_dir}: splits folder not found (run `cnmc split`)")
    if out_dir.exists() and not out_dir.is_dir():
        raise CnmcError(f"{out_dir}: exists and is not a folder")
    size, strength = cfg.image_size, cfg.strength
    framing = Framing(size, cfg.crop, cfg.crop_margin)

    plans: list[_SplitPlan] = []
    for split in SPLITS:
        df = _read_split(splits_dir, split)
        if df is None:
            continue
        csv = splits_dir / f"{split}.csv"
        if split == "train":
            # Online, the store keeps every original and no augmented image; M is the epoch's (sampling).
            per_class = (
                resolve_per_class(df, "auto") if cfg.online else resolve_per_class(df, cfg.per_class, cfg.auto_min)
            )
            plans.append(_plan_train(csv, df, per_class, seed, cfg.online))
        else:
            plans.append(_plan_plain(split, csv, df))

    workers = cfg.workers or default_workers()
    total = sum(len(p.sources) + len(p.augment) for p in plans)
    chunk = max(1, min(_MAX_CHUNK, math.ceil(total / (workers * 4))))

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    plain_mode(tmp)  # it becomes the store
    try:
        resize_tasks: list[tuple[Any, ...]] = []
        augment_tasks: list[tuple[Any, ...]] = []
        for plan in plans:
            split_dir = tmp / plan.name
            split_dir.mkdir()
            npy = str(split_dir / IMAGES_FILE)
            images = np.lib.format.open_memmap(npy, mode="w+", dtype=np.uint8, shape=(len(plan.index), size, size, 3))
            del images
            resize_tasks += [("resize", npy, framing, strength, list(c)) for c in _chunks(plan.sources, chunk)]
            augment_tasks += [("augment", npy, framing, strength, list(c)) for c in _chunks(plan.augment, chunk)]
        with tqdm(total=total, desc="augment", unit="img", disable=not progress) as bar:
            _run_tasks([t for t in (resize_tasks, augment_tasks) if t], workers, bar)
        for plan in plans:
            plan.index.to_csv(tmp / plan.name / INDEX_FILE, index=False)

        train = next(p for p in plans if p.name == "train")
        write_preview(tmp / "train", preview_path, cfg, seed)
        seconds = time.perf_counter() - started
        # Only what determines the images: no timing or worker count (the summary line has
        # those), so a rerun with the same inputs writes a byte-identical store for DVC.
        report = {
            "config": cfg.model_dump(),
            "seed": seed,
            "image_size": size,
            "strength": strength,
            "per_class": per_class,
            "splits": {p.name: {"images": len(p.index), "csv": str(p.csv), "classes": p.counts} for p in plans},
        }
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
        os.chmod(tmp, 0o755)
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    return PrepareSummary(
        out_dir=out_dir,
        image_size=size,
        strength=strength,
        per_class=per_class,
        split_counts={p.name: len(p.index) for p in plans},
        train_original={label: train.counts[label]["original"] for label in LABELS},
        train_augmented={label: train.counts[label]["augmented"] for label in LABELS},
        train_dropped={label: train.counts[label]["dropped"] for label in LABELS},
        workers=workers,
        seconds=seconds,
    )


def _replace_dir(new: Path, target: Path) -> None:
    """Swap the finished folder ``new`` in at ``target`` (two renames, then delete the old one)."""
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.rename(target, old / target.name)
        os.rename(new, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(new, target)


# --------------------------------------------------------------------------- preview


def write_preview(train_dir: Path, preview_path: Path, cfg: AugmentConfig, seed: int) -> None:
    """A PNG grid: ``cfg.preview_images`` originals (both classes), each then 5 augmentations.

    Stored augmentations of that original are shown first; where it has fewer than 5, fresh
    seeded draws of T at ``cfg.strength`` fill the row (titled "T draw").
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from cnmc.data.store import ImageStore

    store = ImageStore(train_dir)
    index = store.index
    augmented = index["augmented"].astype(int).to_numpy()
    origin = index["origin"].astype(int).to_numpy()
    n_aug = np.bincount(origin[augmented == 1], minlength=len(index))

    by_class: list[list[int]] = []
    for label in LABELS:
        rows = np.flatnonzero(((index["label"] == label) & (augmented == 0)).to_numpy())
        shuffled = _rng(seed, _TAG_PREVIEW, TARGETS[label]).permutation(rows)
        shuffled = shuffled[np.argsort(-n_aug[shuffled], kind="stable")]  # originals with stored copies first
        by_class.append([int(r) for r in shuffled])
    chosen: list[int] = []
    while len(chosen) < cfg.preview_images and any(by_class):
        for queue in by_class:
            if queue and len(chosen) < cfg.preview_images:
                chosen.append(queue.pop(0))

    transform = paper_transform(cfg.image_size, cfg.strength)
    ncols = 1 + PREVIEW_AUGMENTATIONS
    fig = Figure(figsize=(1.7 * ncols, 1.9 * len(chosen) + 0.6))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(chosen), ncols, squeeze=False)
    rng_state = torch.get_rng_state()
    try:
        for i, row in enumerate(chosen):
            label = index["label"].iloc[row]
            cells: list[tuple[np.ndarray, str]] = [(store.images[row], f"{label.upper()} original #{row}")]
            for r in np.flatnonzero((origin == row) & (augmented == 1))[:PREVIEW_AUGMENTATIONS]:
                cells.append((store.images[r], f"stored #{r}"))
            j = 0
            while len(cells) < ncols:
                torch.manual_seed(derive_seed(seed, row, j, tag=_TAG_PREVIEW_AUG))
                source = torch.from_numpy(np.array(store.images[row])).permute(2, 0, 1)
                cells.append((transform(source).permute(1, 2, 0).numpy(), "T draw"))
                j += 1
            for ax, (image, title) in zip(axes[i], cells, strict=True):
                ax.imshow(image)
                ax.set_title(title, fontsize=7)
                ax.set_axis_off()
    finally:
        torch.set_rng_state(rng_state)
    fig.suptitle(
        f"Augmentation T at strength {cfg.strength:g} ({cfg.image_size}x{cfg.image_size} px): "
        "each row an original (ALL or HEM), then its augmentations",
        fontsize=9,
    )
    fig.tight_layout()
    preview_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = preview_path.with_name(f".{preview_path.stem}.tmp-{os.getpid()}.png")
    try:
        fig.savefig(tmp, format="png", dpi=100)
        os.replace(tmp, preview_path)
    finally:
        tmp.unlink(missing_ok=True)
