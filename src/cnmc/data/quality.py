"""A cheap look at a decoded image before any model sees it: what is obviously not a cell.

A C-NMC cell is one segmented cell on a black frame. A blank or near-uniform frame, a frame with
nothing brighter than the background, pixel noise, scattered marks (text, specks) with no one object
among them, or a thin strip stretched to a square gives the model nothing to judge, yet a classifier
answers anyway. These rules need no forward pass; what they
pass still gets the model's own familiarity score (:mod:`cnmc.inference.familiarity`).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from cnmc.data.transforms import FOREGROUND_LEVEL

MAX_ASPECT = 3.0  # a side more than this many times the other: a strip, not a cell's frame
MIN_SPREAD = 4.0  # grey-level standard deviation (0-255) below this: a blank or near-uniform frame
MIN_FOREGROUND = 0.005  # share of pixels brighter than the background below this: no object to judge
# Mean grey-level step between neighbouring pixels above this: noise. A micrograph is smooth at the
# pixel scale: C-NMC cells step 0.2-0.6, another lab's unsegmented crops (ALL-IDB2) 1.7-5, uniform noise 57.
MAX_PIXEL_STEP = 12.0
# A cell is one object: the largest connected foreground region holds at least this share of the
# foreground (every C-NMC cell holds all of it, JPEG-saved, shrunk or turned 99.7%; a line of text 10-17%)
MIN_MAIN_OBJECT = 0.5
# and covers at least this share of the frame (C-NMC cells 6.8-40%, shrunk to 96 px 3.7%; text 0.05-0.6%).
MIN_OBJECT_AREA = 0.01


# An image is segmented on black, as every C-NMC cell is, when at least this share of its outermost
# ring of pixels is background.
MIN_DARK_BORDER = 0.5
NOT_SEGMENTED = "not a cell segmented on a black background, as the model's training cells all were"


def foreground(rgb: np.ndarray) -> np.ndarray:
    """Pixels of an (H, W, 3) image (or any (..., 3) array) brighter than :data:`FOREGROUND_LEVEL` in any channel.

    Channel by channel: numpy's ``max(axis=2)`` over the interleaved last axis took 0.59 s on a
    4000x4000 image (the largest the server accepts), this 0.02 s."""
    return np.maximum(np.maximum(rgb[..., 0], rgb[..., 1]), rgb[..., 2]) > FOREGROUND_LEVEL


def dark_border_share(rgb: np.ndarray) -> float:
    """The share of an (H, W, 3) image's outermost ring of pixels that is background (no channel
    brighter than :data:`FOREGROUND_LEVEL`, :func:`foreground`'s rule); only the ring is read."""
    ring = np.concatenate([rgb[0], rgb[-1], rgb[1:-1, 0], rgb[1:-1, -1]])
    return float((~foreground(ring)).mean())


def segmented_on_black(rgb: np.ndarray) -> bool:
    return dark_border_share(rgb) >= MIN_DARK_BORDER


def quality_problem(rgb: np.ndarray) -> str:
    """Why a decoded uint8 (H, W, 3) image is not a cell to judge, or "" when nothing is wrong."""
    height, width = rgb.shape[:2]
    if max(height, width) > MAX_ASPECT * min(height, width):
        return f"extreme aspect ratio ({width}x{height} pixels): not a cell's frame"
    grey = rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    if float(grey.std()) < MIN_SPREAD:
        return "blank or near-uniform image: no cell to judge"
    mask = foreground(rgb)
    if float(mask.mean()) < MIN_FOREGROUND:
        return "nothing brighter than the background: no cell to judge"
    if (step := float(np.abs(np.diff(grey, axis=1)).mean())) > MAX_PIXEL_STEP:
        return f"pixel noise, not a micrograph (neighbouring pixels differ by {step:.0f} grey levels on average)"
    return object_problem(mask)


def object_problem(mask: np.ndarray) -> str:
    """Why a foreground mask holds no cell-shaped object (scattered marks, or one too small), else ""."""
    labels, count = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    sizes = np.bincount(labels.ravel())[1:]
    largest = int(sizes.max()) if count else 0
    if largest < MIN_MAIN_OBJECT * mask.sum():
        return f"no cell-shaped object: {count} scattered marks (text or specks), none holding half the foreground"
    if largest < MIN_OBJECT_AREA * mask.size:
        return f"no cell-shaped object: the largest object covers {largest / mask.size:.2%} of the frame"
    return ""
