"""Deterministic synthetic C-NMC data sets for tests: any size, the real layout, no real cells.

The demo ships real cells (``cnmc.data.demo``); tests that need a tiny or a full-size tree in
the Kaggle layout build one here.

The set mimics the Kaggle mirror's layout, names and image format (450x450 24-bit BMP, one
purple segmented cell on black). ALL and Hem cells differ in several learnable but overlapping
ways (cell size, nucleus share and position, outline irregularity, chromatin grain, nucleoli),
and every subject has its own stain, brightness and size, so a subject-disjoint split is harder
than a random one, as on real data.

The files must be byte-identical for a seed on any machine (``data.dvc`` pins them). So every
random draw comes from :class:`random.Random` (a stable algorithm, seeded by a string), the
per-cell parameters use only IEEE-exact float operations (+, -, *, /, sqrt), every per-pixel
computation is integer arithmetic, and the BMP bytes are written here rather than by a library.
"""

from __future__ import annotations

import csv
import math
import random
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np

from cnmc.core.atomic import fill_new_folder

ROOT = "C-NMC_Leukemia"
TRAIN_DIR = f"{ROOT}/training_data"
PRELIM_DIR = f"{ROOT}/validation_data/C-NMC_test_prelim_phase_data"
PRELIM_CSV = f"{ROOT}/validation_data/C-NMC_test_prelim_phase_data_labels.csv"
FINAL_DIR = f"{ROOT}/testing_data/C-NMC_test_final_phase_data"
FOLDS = 3
_T = TypeVar("_T")

REFERENCE_SIZE = 450  # the real image side; geometry below is given in its pixels
ANGLE_BINS = 1024  # resolution of the outline tables (pseudo-angle over the full turn)
BASE_RADIUS = {"all": 108.0, "hem": 90.0}  # lymphoblasts are larger than mature lymphocytes
NUCLEUS_RGB = (62, 24, 78)
CYTOPLASM_RGB = (78, 40, 90)
NUCLEOLUS_RGB = (100, 60, 104)
CHROMATIN_TINT = (5, 5, 3)  # /4: pale chromatin turns pink, dense chromatin blue, as stained


@dataclass(frozen=True)
class SyntheticConfig:
    """Size of a synthetic set in the Kaggle C-NMC layout."""

    train_subjects_per_class: int = 8  # training subjects per class, spread over 3 folds (>= 3)
    prelim_subjects_per_class: int = 2  # preliminary-test subjects per class
    all_cells_per_subject: int = 18
    hem_cells_per_subject: int = 10
    final_images: int = 6  # unlabelled final-phase images
    image_size: int = 450  # side of the square BMPs (450 as in C-NMC)


@dataclass(frozen=True)
class SyntheticSummary:
    """What :func:`write_synthetic_dataset` wrote; ``str()`` is a one-line report."""

    out_dir: Path
    train_all: int
    train_hem: int
    prelim_all: int
    prelim_hem: int
    final: int
    subjects: int

    @property
    def total(self) -> int:
        return self.train_all + self.train_hem + self.prelim_all + self.prelim_hem + self.final

    def __str__(self) -> str:
        return (
            f"wrote {self.total} demo images from {self.subjects} subjects to {self.out_dir}: "
            f"training {self.train_all} ALL + {self.train_hem} Hem in {FOLDS} folds, "
            f"preliminary {self.prelim_all} ALL + {self.prelim_hem} Hem, "
            f"final {self.final} unlabelled"
        )


@dataclass(frozen=True)
class _Subject:
    """One person: a class, where their cells go, and the look all their cells share."""

    sid: str  # "7" for ALL, "H7" for Hem, as in the real names
    label: str  # "all" or "hem"
    stain: tuple[int, int, int]  # RGB offsets of this subject's slides
    brightness: float
    size: float
    contrast: float
    nucleus_shift: float


def write_synthetic_dataset(out_dir: Path, cfg: SyntheticConfig, seed: int) -> SyntheticSummary:
    """Write the synthetic set into ``out_dir`` (absent or empty), all at once or not at all.

    Everything is built in a hidden sibling folder that is renamed to ``out_dir`` at the end,
    so an interrupted run never leaves a set that looks complete.
    """
    out_dir = Path(out_dir)
    return fill_new_folder(out_dir, lambda tmp: _write_all(tmp, cfg, seed, out_dir))


def _write_all(root: Path, cfg: SyntheticConfig, seed: int, out_dir: Path) -> SyntheticSummary:
    """Render every cell of the set under ``root``; the summary names ``out_dir``."""
    train, prelim = _plan_subjects(cfg, seed)
    counts: Counter[str] = Counter()
    for fold, subject in train:
        folder = root / TRAIN_DIR / f"fold_{fold}" / subject.label
        folder.mkdir(parents=True, exist_ok=True)
        for name in _cell_names(subject, _cells_per_subject(cfg, subject.label), seed):
            _write_cell(folder / name, subject, name, cfg.image_size, seed)
            counts[f"train_{subject.label}"] += 1

    originals = [
        (name, subject)
        for subject in prelim
        for name in _cell_names(subject, _cells_per_subject(cfg, subject.label), seed)
    ]
    order = _shuffled(random.Random(f"cnmc-demo/{seed}/prelim-order"), originals)
    folder = root / PRELIM_DIR
    folder.mkdir(parents=True)
    rows = []
    for number, (name, subject) in enumerate(order, start=1):
        _write_cell(folder / f"{number}.bmp", subject, name, cfg.image_size, seed)
        rows.append((name, f"{number}.bmp", 1 if subject.label == "all" else 0))
        counts[f"prelim_{subject.label}"] += 1
    with (root / PRELIM_CSV).open("w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["Patient_ID", "new_names", "labels"])
        writer.writerows(rows)

    folder = root / FINAL_DIR
    folder.mkdir(parents=True)
    for number in range(1, cfg.final_images + 1):
        rng = random.Random(f"cnmc-demo/{seed}/final/{number}")
        subject = _draw_subject(rng, f"F{number}", "all" if rng.random() < 0.6 else "hem")
        _write_cell(folder / f"{number}.bmp", subject, f"final-{number}", cfg.image_size, seed)

    return SyntheticSummary(
        out_dir=out_dir,
        train_all=counts["train_all"],
        train_hem=counts["train_hem"],
        prelim_all=counts["prelim_all"],
        prelim_hem=counts["prelim_hem"],
        final=cfg.final_images,
        subjects=len(train) + len(prelim),
    )


def _cells_per_subject(cfg: SyntheticConfig, label: str) -> int:
    return cfg.all_cells_per_subject if label == "all" else cfg.hem_cells_per_subject


def _plan_subjects(cfg: SyntheticConfig, seed: int) -> tuple[list[tuple[int, _Subject]], list[_Subject]]:
    """Training subjects with their fold, and the (different) preliminary-test subjects.

    Ids are shuffled so that neither split owns a tidy range; folds are dealt round-robin per
    class, so with at least three subjects per class every fold holds both classes.
    """
    rng = random.Random(f"cnmc-demo/{seed}/plan")
    n_train, n_prelim = cfg.train_subjects_per_class, cfg.prelim_subjects_per_class
    train: list[tuple[int, _Subject]] = []
    prelim: list[_Subject] = []
    for offset, (label, prefix) in enumerate((("all", ""), ("hem", "H"))):
        ids = _shuffled(rng, list(range(1, n_train + n_prelim + 1)))
        sids = [f"{prefix}{i}" for i in ids]
        subjects = [_draw_subject(random.Random(f"cnmc-demo/{seed}/subject/{sid}"), sid, label) for sid in sids]
        train += [((k + offset) % FOLDS, s) for k, s in enumerate(subjects[:n_train])]
        prelim += subjects[n_train:]
    return train, prelim


def _draw_subject(rng: random.Random, sid: str, label: str) -> _Subject:
    """A subject's shared look: the subject effect a model can overfit to."""
    return _Subject(
        sid=sid,
        label=label,
        stain=(round(_normal(rng, 0, 7)), round(_normal(rng, 0, 4)), round(_normal(rng, 0, 7))),
        brightness=_normal(rng, 1.0, 0.09),
        size=_normal(rng, 1.0, 0.08),
        contrast=_normal(rng, 1.0, 0.15),
        nucleus_shift=_normal(rng, 0.0, 0.03),
    )


def _cell_names(subject: _Subject, count: int, seed: int) -> list[str]:
    """Real-style ``UID_<subj>_<img>_<cell>_<class>.bmp`` names: 1-3 cells per image, gaps."""
    rng = random.Random(f"cnmc-demo/{seed}/names/{subject.sid}")
    names: list[str] = []
    image = 1
    while len(names) < count:
        for cell in range(1, min(1 + int(rng.random() * 3), count - len(names)) + 1):
            names.append(f"UID_{subject.sid}_{image}_{cell}_{subject.label}.bmp")
        image += 1 + (rng.random() < 0.3)
    return names


def synthetic_cell_bmp(size: int = 60, seed: int = 0, label: str = "all") -> bytes:
    """One synthetic cell of a person of its own as BMP bytes: a request's image that looks like the
    cells the tiny test models train on."""
    rng = random.Random(f"cnmc-demo/{seed}/one-cell")
    return bmp_bytes(_render_cell(rng, _draw_subject(rng, f"S{seed}", label), size))


def _write_cell(path: Path, subject: _Subject, name: str, size: int, seed: int) -> None:
    """Render one cell, seeded by its original name so it never depends on generation order."""
    rng = random.Random(f"cnmc-demo/{seed}/cell/{name}")
    path.write_bytes(bmp_bytes(_render_cell(rng, subject, size)))


def _render_cell(rng: random.Random, subject: _Subject, size: int) -> np.ndarray:
    """One cell on black as an (size, size, 3) uint8 array.

    A textured nucleus (chromatin grain, pale nucleoli) sits in a lighter cytoplasm inside an
    irregular outline with a dark rim. Class shifts the distributions of every property below,
    but they overlap, so no single one separates ALL from Hem.
    """
    is_all = subject.label == "all"
    scale = size / REFERENCE_SIZE
    radius = BASE_RADIUS[subject.label] * subject.size * _normal(rng, 1.0, 0.07) * scale
    cx = round(size / 2 + _normal(rng, 0, 0.025 * size))
    cy = round(size / 2 + _normal(rng, 0, 0.025 * size))
    jag = max(0.0, _normal(rng, 0.032, 0.014) if is_all else _normal(rng, 0.016, 0.01))
    cell_r16 = _outline_table(rng, radius, jag, 20 + int(rng.random() * 20))

    share = _normal(rng, 0.89 if is_all else 0.78, 0.06) + subject.nucleus_shift
    share = min(0.97, max(0.55, share))
    ux, uy = _unit_vector(rng)
    off = (1 - share) * radius * (rng.uniform(0.0, 0.6) if is_all else rng.uniform(0.3, 0.95))
    ox, oy = round(ux * off), round(uy * off)
    nuc_r16 = _outline_table(rng, radius * share, jag * 0.6, 16 + int(rng.random() * 16))

    reach = int(cell_r16.max()) // 16 + 2
    y0, y1 = max(0, cy - reach), min(size, cy + reach + 1)
    x0, x1 = max(0, cx - reach), min(size, cx + reach + 1)
    dy = np.arange(y0, y1, dtype=np.int64)[:, None] - cy
    dx = np.arange(x0, x1, dtype=np.int64)[None, :] - cx
    shape = (y1 - y0, x1 - x0)

    edge = _edge16(dx, dy, cell_r16)
    alpha = np.clip(edge, 0, 16)  # one-pixel anti-aliased border, in 1/16
    nucleus = np.clip(_edge16(dx - ox, dy - oy, nuc_r16) + 24, 0, 48) // 3  # 3-pixel blend, in 1/16

    fine_grid = rng.uniform(5.0, 9.0) if is_all else rng.uniform(8.0, 13.0)
    coarse_grid = rng.uniform(14.0, 22.0) if is_all else rng.uniform(18.0, 30.0)
    fine = _texture(rng, shape, fine_grid * scale)
    coarse = _texture(rng, shape, coarse_grid * scale)
    fine_weight = round(256 * (rng.uniform(0.55, 0.8) if is_all else rng.uniform(0.25, 0.5)))
    grain = ((fine * fine_weight + coarse * (256 - fine_weight)) >> 8) - 128
    depth = _normal(rng, 0.19, 0.04) if is_all else _normal(rng, 0.24, 0.05)
    depth = round(1024 * subject.contrast * depth)
    spots = _nucleoli(rng, dx - ox, dy - oy, radius * share, is_all)

    rim16 = max(16, round(rng.uniform(3.0, 7.0) * scale * 16))
    rim = np.clip(rim16 - edge, 0, rim16) * round(1024 * rng.uniform(0.2, 0.4)) // rim16
    light = round(1024 * subject.brightness * _normal(rng, 1.0, 0.04))

    box = np.empty(shape + (3,), dtype=np.int64)
    for c in range(3):
        nuc = NUCLEUS_RGB[c] * (1024 + grain * depth * CHROMATIN_TINT[c] // 512) // 1024
        nuc = (nuc * (256 - spots) + NUCLEOLUS_RGB[c] * spots) >> 8
        cyto = CYTOPLASM_RGB[c] * (1024 + (coarse - 128) * 100 // 128) // 1024
        colour = (nuc * nucleus + cyto * (16 - nucleus)) // 16
        colour = colour * (1024 - rim) // 1024
        colour = np.clip((colour + subject.stain[c]) * light // 1024, 1, 255)
        box[..., c] = colour * alpha // 16
    image = np.zeros((size, size, 3), dtype=np.uint8)
    image[y0:y1, x0:x1] = box
    return image


def _nucleoli(rng: random.Random, dx: np.ndarray, dy: np.ndarray, r_nuc: float, is_all: bool) -> np.ndarray:
    """Pale nucleoli as a 0..256 blend weight: prominent and frequent in blasts, rare in Hem."""
    count = sum(rng.random() < p for p in ((0.75, 0.45, 0.2) if is_all else (0.3, 0.05)))
    weight = np.zeros(np.broadcast_shapes(dx.shape, dy.shape), dtype=np.int64)
    for _ in range(count):
        ux, uy = _unit_vector(rng)
        dist = r_nuc * rng.uniform(0.0, 0.55)
        r = r_nuc * (rng.uniform(0.06, 0.11) if is_all else rng.uniform(0.04, 0.08))
        r16 = max(16, round(r * 16))
        sx, sy = dx - round(ux * dist), dy - round(uy * dist)
        edge = (r16 * r16 - 256 * (sx * sx + sy * sy)) // (2 * r16)
        strength = round(256 * rng.uniform(0.3, 0.65))
        weight = np.maximum(weight, np.clip(edge, 0, 32) * strength // 32)
    return weight


def _outline_table(rng: random.Random, radius: float, jag: float, teeth: int) -> np.ndarray:
    """Radius per pseudo-angle bin, in 1/16 pixel: an oval, a few lumps and ``jag``-sized teeth.

    Built from periodic value noise with only exact float operations, then rounded once.
    """
    elong = _normal(rng, 0.07, 0.04)
    ovality = _periodic_noise([elong, -elong, elong, -elong], ANGLE_BINS)
    knots = 3 + int(rng.random() * 4)
    lumps = _periodic_noise([rng.uniform(-0.11, 0.11) for _ in range(knots)], ANGLE_BINS)
    teeth_noise = _periodic_noise([rng.uniform(-jag, jag) for _ in range(teeth)], ANGLE_BINS)
    table = radius * (1.0 + np.roll(ovality, int(rng.random() * ANGLE_BINS)) + lumps + teeth_noise)
    return np.maximum(16, np.rint(table * 16)).astype(np.int64)


def _periodic_noise(values: list[float], bins: int) -> np.ndarray:
    """Smoothstep interpolation of ``values`` around a closed loop of ``bins`` samples."""
    knots = np.asarray(values, dtype=np.float64)
    pos = np.arange(bins, dtype=np.float64) * len(values) / bins
    index = pos.astype(np.int64)
    frac = pos - index
    w = frac * frac * (3.0 - 2.0 * frac)
    return knots[index] * (1.0 - w) + knots[(index + 1) % len(values)] * w


def _edge16(dx: np.ndarray, dy: np.ndarray, table16: np.ndarray) -> np.ndarray:
    """Signed distance to the outline (positive inside) in 1/16 pixel, integers only.

    Uses (r^2 - d^2) / 2r, which equals r - d at the border where precision matters.
    """
    r16 = table16[_pseudo_angle(dx, dy)]
    return (r16 * r16 - 256 * (dx * dx + dy * dy)) // (2 * r16)


def _pseudo_angle(dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """Monotone angle in [0, ANGLE_BINS) from integer offsets, without atan2 (diamond angle)."""
    dx, dy = np.broadcast_arrays(dx, dy)
    quarter = ANGLE_BINS // 4
    t = np.abs(dy) * quarter // np.maximum(np.abs(dx) + np.abs(dy), 1)
    upper = np.where(dx > 0, t, 2 * quarter - t)
    lower = np.where(dx < 0, 2 * quarter + t, 4 * quarter - t)
    angle = np.where(dy >= 0, upper, lower)
    return angle % ANGLE_BINS


def _texture(rng: random.Random, shape: tuple[int, int], grid: float) -> np.ndarray:
    """0..255 noise of feature size ``grid``; a second lattice of other pitch hides the squares."""
    first = _value_noise(rng, shape, max(2, round(grid)))
    second = _value_noise(rng, shape, max(3, round(grid * 1.47)))
    return np.clip((first + second - 256) * 3 // 4 + 128, 0, 255)


def _value_noise(rng: random.Random, shape: tuple[int, int], grid: int) -> np.ndarray:
    """Smooth 0..255 noise: random bytes on a ``grid``-pixel lattice, integer smoothstep blend."""
    rows, cols = shape[0] // grid + 2, shape[1] // grid + 2
    count = rows * cols
    lattice = np.frombuffer(rng.getrandbits(8 * count).to_bytes(count, "little"), dtype=np.uint8)
    lattice = lattice.astype(np.int64).reshape(rows, cols)
    full = grid**3

    def axis(n: int) -> tuple[np.ndarray, np.ndarray]:
        pos = np.arange(n, dtype=np.int64)
        frac = pos % grid
        return pos // grid, frac * frac * (3 * grid - 2 * frac)

    iy, wy = axis(shape[0])
    ix, wx = axis(shape[1])
    wx = wx[None, :]
    top = lattice[iy][:, ix] * (full - wx) + lattice[iy][:, ix + 1] * wx
    bottom = lattice[iy + 1][:, ix] * (full - wx) + lattice[iy + 1][:, ix + 1] * wx
    return (top * (full - wy[:, None]) + bottom * wy[:, None]) // (full * full)


def _unit_vector(rng: random.Random) -> tuple[float, float]:
    """A uniformly random direction by rejection sampling, avoiding sin/cos."""
    while True:
        x, y = rng.uniform(-1.0, 1.0), rng.uniform(-1.0, 1.0)
        norm2 = x * x + y * y
        if 0.01 < norm2 <= 1.0:
            norm = math.sqrt(norm2)
            return x / norm, y / norm


def _normal(rng: random.Random, mean: float, sd: float) -> float:
    """Approximately normal draw (Irwin-Hall, 4 uniforms): exact arithmetic, bounded tails."""
    total = rng.random() + rng.random() + rng.random() + rng.random()
    return mean + sd * (total - 2.0) * math.sqrt(3.0)


def _shuffled(rng: random.Random, items: list[_T]) -> list[_T]:
    """Fisher-Yates on ``rng.random()`` alone, so no helper's algorithm can change the order."""
    out = list(items)
    for i in range(len(out) - 1, 0, -1):
        j = int(rng.random() * (i + 1))
        out[i], out[j] = out[j], out[i]
    return out


def bmp_bytes(rgb: np.ndarray) -> bytes:
    """An uncompressed 24-bit bottom-up BMP at 96 dpi, written here so no library can change it."""
    height, width, _ = rgb.shape
    pad = (-3 * width) % 4
    rows = np.ascontiguousarray(rgb[::-1, :, ::-1]).reshape(height, 3 * width)
    pixels = np.pad(rows, ((0, 0), (0, pad))).tobytes()
    header = struct.pack("<2sIHHI", b"BM", 54 + len(pixels), 0, 0, 54)
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, len(pixels), 3780, 3780, 0, 0)
    return header + info + pixels
