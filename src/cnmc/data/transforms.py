"""The paper's augmentation T, scalable by a strength, and the plain resize every image gets.

Both work on uint8 ``CHW`` tensors (and PIL images), so T can run once in the ``augment``
stage or on the fly in a ``DataLoader`` (tuning applies T at a trial's strength to the stored
resized originals). torchvision v2 transforms draw from the torch global RNG: seed it with
``torch.manual_seed`` right before calling T to make one draw reproducible.
"""

from __future__ import annotations

import math

import torch
from torchvision.transforms import v2

from cnmc.core.config import Framing

FOREGROUND_LEVEL = 10  # a pixel belongs to the cell when a channel exceeds this (uint8); C-NMC's background is black
# A row or column of the frame belongs to the cell's box when at least this share of it is foreground, so a
# few stray bright pixels (noise, a speck of another cell) do not stretch the box to the frame.
BOX_MIN_SHARE = 0.01

# The paper's T (Ahmed et al. 2025, section 3.2), in its order, at strength 1.
PAPER_IMAGE_SIZE = 224
PAPER_HFLIP_P = 0.5
PAPER_VFLIP_P = 0.5
PAPER_ROTATION_DEGREES = 25.0  # angles in [-25, 25]
PAPER_JITTER_BRIGHTNESS = 0.3
PAPER_JITTER_CONTRAST = 0.3
PAPER_JITTER_SATURATION = 0.3
PAPER_JITTER_HUE = 0.05
PAPER_CROP_SCALE = (0.7, 1.0)
PAPER_CROP_RATIO = (0.75, 1.33)
PAPER_AFFINE_TRANSLATE = 0.05  # fraction of width and of height
PAPER_AFFINE_SCALE = (0.95, 1.05)
PAPER_AFFINE_SHEAR_DEGREES = 10.0
PAPER_BLUR_KERNEL = 3
PAPER_BLUR_SIGMA = (0.1, 2.0)
PAPER_SHARPNESS_FACTOR = 2.0
PAPER_SHARPNESS_P = 0.3
PAPER_PERSPECTIVE_DISTORTION = 0.2
PAPER_PERSPECTIVE_P = 0.3


def paper_transform(image_size: int, strength: float = 1.0) -> v2.Compose:
    """The paper's transform T to ``image_size`` squares, every magnitude scaled by ``strength``.

    ``strength`` 1 gives the paper's values exactly; 0 gives an exact identity on an
    ``image_size`` square input (ops whose magnitude is 0 are left out). In between, each
    magnitude moves linearly towards "no change", as noted op by op below.
    """
    s = float(strength)
    if not 0.0 <= s <= 1.0 or math.isnan(s):
        raise ValueError(f"strength must be in [0, 1], got {strength!r}")
    size = int(image_size)
    ops: list[v2.Transform] = []
    if s > 0:
        # Flips: the probability scales (0.5 at strength 1).
        ops.append(v2.RandomHorizontalFlip(p=PAPER_HFLIP_P * s))
        ops.append(v2.RandomVerticalFlip(p=PAPER_VFLIP_P * s))
        # Rotation: the angle range scales (+-25 deg at strength 1).
        ops.append(v2.RandomRotation(degrees=PAPER_ROTATION_DEGREES * s))
        # Colour jitter: each max delta scales (brightness/contrast/saturation 0.3, hue 0.05).
        ops.append(
            v2.ColorJitter(
                brightness=PAPER_JITTER_BRIGHTNESS * s,
                contrast=PAPER_JITTER_CONTRAST * s,
                saturation=PAPER_JITTER_SATURATION * s,
                hue=PAPER_JITTER_HUE * s,
            )
        )
        # Resized crop: the distance of the scale and ratio bounds from 1 scales.
        ops.append(
            v2.RandomResizedCrop(
                (size, size),
                scale=tuple(1.0 - (1.0 - b) * s for b in PAPER_CROP_SCALE),
                ratio=tuple(1.0 - (1.0 - b) * s for b in PAPER_CROP_RATIO),
                antialias=True,
            )
        )
        # Affine: translation, distance of the scale bounds from 1, and shear angle scale.
        ops.append(
            v2.RandomAffine(
                degrees=0.0,
                translate=(PAPER_AFFINE_TRANSLATE * s, PAPER_AFFINE_TRANSLATE * s),
                scale=tuple(1.0 - (1.0 - b) * s for b in PAPER_AFFINE_SCALE),
                shear=PAPER_AFFINE_SHEAR_DEGREES * s,
            )
        )
        # Blur: always applied; the sigma upper bound scales from 0.1 (~identity) up to 2.0.
        lo, hi = PAPER_BLUR_SIGMA
        ops.append(v2.GaussianBlur(kernel_size=PAPER_BLUR_KERNEL, sigma=(lo, lo + (hi - lo) * s)))
        # Sharpness: factor 2 kept; the probability of applying it scales (0.3 at strength 1).
        ops.append(v2.RandomAdjustSharpness(sharpness_factor=PAPER_SHARPNESS_FACTOR, p=PAPER_SHARPNESS_P * s))
        # Perspective: probability 0.3 kept; the distortion scale scales (0.2 at strength 1).
        ops.append(v2.RandomPerspective(distortion_scale=PAPER_PERSPECTIVE_DISTORTION * s, p=PAPER_PERSPECTIVE_P))
    else:
        # Strength 0: only a resize to the output size, which returns a same-size input untouched.
        ops.append(resize_transform(size))
    return v2.Compose(ops)


def resize_transform(image_size: int) -> v2.Resize:
    """What val/test images and the originals get: an antialiased resize to ``image_size`` squared.

    Non-square inputs are stretched to the square (the C-NMC cells are 450x450 already).
    """
    return v2.Resize((int(image_size), int(image_size)), antialias=True)


def cell_box(chw: torch.Tensor, margin: float) -> tuple[int, int, int]:
    """``(top, left, side)`` of the square around the cell in a uint8 (3, H, W) image: the bounding box
    of its foreground (pixels brighter than :data:`FOREGROUND_LEVEL` in any channel), squared about its
    centre and widened by ``margin`` of its side on every edge. An image with no foreground gives the
    square about the whole frame. The square may reach past the frame (a cell touching the border)."""
    height, width = chw.shape[-2:]
    foreground = chw.amax(dim=0) > FOREGROUND_LEVEL
    rows = (foreground.sum(dim=1) >= max(1, BOX_MIN_SHARE * width)).nonzero().flatten()
    cols = (foreground.sum(dim=0) >= max(1, BOX_MIN_SHARE * height)).nonzero().flatten()
    if len(rows) == 0 or len(cols) == 0:
        top, bottom, left, right = 0, height - 1, 0, width - 1
    else:
        top, bottom, left, right = int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])
    side = max(bottom - top + 1, right - left + 1)
    side = max(1, round(side * (1 + 2 * margin)))
    centre_y, centre_x = (top + bottom + 1) / 2, (left + right + 1) / 2
    return round(centre_y - side / 2), round(centre_x - side / 2), side


def crop_to_cell(chw: torch.Tensor, margin: float) -> torch.Tensor:
    """The square around the cell (:func:`cell_box`) cut from a uint8 (3, H, W) image; where the square
    passes the frame's edge it is filled with black, the cells' own background, so a cell touching the
    border keeps all of its pixels and its place in the square."""
    top, left, side = cell_box(chw, margin)
    height, width = chw.shape[-2:]
    out = torch.zeros((chw.shape[0], side, side), dtype=chw.dtype)
    src_top, src_left = max(top, 0), max(left, 0)
    src_bottom, src_right = min(top + side, height), min(left + side, width)
    out[:, src_top - top : src_bottom - top, src_left - left : src_right - left] = chw[
        :, src_top:src_bottom, src_left:src_right
    ]
    return out


def frame(chw: torch.Tensor, framing: Framing) -> torch.Tensor:
    """A uint8 (3, H, W) image as a model of ``framing`` sees it: uint8 (3, S, S), cut to the cell's
    square first where ``framing.crop`` is ``cell`` (:class:`cnmc.core.config.Framing`)."""
    if framing.crop == "cell":
        chw = crop_to_cell(chw, framing.margin)
    return resize_transform(framing.image_size)(chw)
