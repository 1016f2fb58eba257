"""A cheap look at a decoded image before any model sees it: what is obviously not a cell.

A C-NMC cell is one segmented cell on a black frame. A blank or near-uniform frame, a frame with
nothing brighter than the background, pixel noise, or a thin strip stretched to a square gives the
model nothing to judge, yet a classifier answers anyway. These rules need no forward pass; what they
pass still gets the model's own familiarity score (:mod:`cnmc.inference.familiarity`).
"""

from __future__ import annotations

import numpy as np

from cnmc.data.transforms import FOREGROUND_LEVEL

MAX_ASPECT = 3.0  # a side more than this many times the other: a strip, not a cell's frame
MIN_SPREAD = 4.0  # grey-level standard deviation (0-255) below this: a blank or near-uniform frame
MIN_FOREGROUND = 0.005  # share of pixels brighter than the background below this: no object to judge
# Mean grey-level step between neighbouring pixels above this: noise. A micrograph is smooth at the
# pixel scale: C-NMC cells step 0.2-0.6, another lab's unsegmented crops (ALL-IDB2) 1.7-5, uniform noise 57.
MAX_PIXEL_STEP = 12.0


# An image is segmented on black, as every C-NMC cell is, when at least this share of its outermost
# ring of pixels is background.
MIN_DARK_BORDER = 0.5
NOT_SEGMENTED = "not a cell segmented on a black background, as the model's training cells all were"


def dark_border_share(rgb: np.ndarray) -> float:
    """The share of an (H, W, 3) image's outermost ring of pixels that is background (no channel
    brighter than :data:`FOREGROUND_LEVEL`)."""
    dark = rgb.max(axis=2) <= FOREGROUND_LEVEL
    ring = np.concatenate([dark[0], dark[-1], dark[1:-1, 0], dark[1:-1, -1]])
    return float(ring.mean())


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
    if float((rgb.max(axis=2) > FOREGROUND_LEVEL).mean()) < MIN_FOREGROUND:
        return "nothing brighter than the background: no cell to judge"
    if (step := float(np.abs(np.diff(grey, axis=1)).mean())) > MAX_PIXEL_STEP:
        return f"pixel noise, not a micrograph (neighbouring pixels differ by {step:.0f} grey levels on average)"
    return ""
