"""Training-time levers that act on whole uint8 batches: random symmetries and HED stain jitter.

Both work on (B, H, W, 3) uint8 batches before normalisation, a few vectorised ops per batch, so
they cost next to nothing beside a training step. They draw from a ``torch.Generator`` the
trainer seeds per epoch, so a resumed run draws the same.

- A segmented cell has no up, down, left or right: :func:`random_symmetries` gives each cell one
  of the 8 elements of D4 (the same views test-time augmentation averages, :mod:`cnmc.inference.tta`), and
  with ``any_angle`` a further rotation of the whole batch by a random angle.
- Donors differ in staining. :func:`hed_jitter` (Tellez et al. 2019) moves each cell in the
  haematoxylin-eosin-DAB colour space: every stain channel scaled by U(1 - s, 1 + s) and shifted
  by U(-s, s), per cell, the black background left black.
"""

from __future__ import annotations

import math

import torch
from torchvision.transforms.v2 import functional as F

# scikit-image's rgb_from_hed (Ruifrok & Johnston): the optical density of each stain in RGB.
RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=torch.float32)
RGB_FROM_HED = RGB_FROM_HED / RGB_FROM_HED.norm(dim=1, keepdim=True)
RGB_FROM_HED[2] = torch.linalg.cross(RGB_FROM_HED[0], RGB_FROM_HED[1])
HED_FROM_RGB = torch.linalg.inv(RGB_FROM_HED)
_LOG_FLOOR = 1e-6


def symmetry(batch: torch.Tensor, element: int) -> torch.Tensor:
    """Element ``element`` (0-7, in :data:`cnmc.inference.tta.VIEW_NAMES` order) of D4 on a (B, H, W, C) batch."""
    spatial = (1, 2)
    if element < 4:
        return torch.rot90(batch, element, dims=spatial)
    if element == 4:
        return batch.flip(2)
    if element == 5:
        return batch.flip(1)
    transposed = batch.transpose(1, 2)
    return transposed if element == 6 else transposed.flip(1, 2)


def random_symmetries(batch: torch.Tensor, generator: torch.Generator, any_angle: bool = False) -> torch.Tensor:
    """Each square image of a (B, S, S, 3) batch under a random element of D4; with ``any_angle``,
    the batch then turned by one random angle in [0, 90) degrees (corners filled black)."""
    if batch.ndim != 4 or batch.shape[1] != batch.shape[2]:
        raise ValueError(f"need a (B, S, S, C) batch of square images, got {tuple(batch.shape)}")
    elements = torch.randint(0, 8, (batch.shape[0],), generator=generator)
    out = torch.empty_like(batch)
    for element in range(8):
        rows = (elements == element).nonzero().flatten()
        if len(rows):
            out[rows] = symmetry(batch[rows], element)
    if any_angle:
        angle = float(torch.rand((), generator=generator)) * 90.0
        chw = F.rotate(out.permute(0, 3, 1, 2), angle, interpolation=F.InterpolationMode.BILINEAR)
        out = chw.permute(0, 2, 3, 1).contiguous()
    return out


def hed_jitter(batch: torch.Tensor, sigma: float, generator: torch.Generator) -> torch.Tensor:
    """A (B, H, W, 3) uint8 batch with each cell's stains scaled and shifted at random (see above)."""
    if sigma <= 0:
        return batch
    n = batch.shape[0]
    rgb = batch.to(torch.float32) / 255.0
    density = -torch.log(rgb.clamp_min(_LOG_FLOOR)) / -math.log(_LOG_FLOOR)  # 0 (white) .. 1 (black)
    stains = density @ HED_FROM_RGB
    scale = 1 + (torch.rand(n, 1, 1, 3, generator=generator) * 2 - 1) * sigma
    shift = (torch.rand(n, 1, 1, 3, generator=generator) * 2 - 1) * sigma
    jittered = (stains * scale + shift) @ RGB_FROM_HED
    out = torch.exp(-jittered.clamp_min(0) * -math.log(_LOG_FLOOR)) * 255.0
    background = (batch == 0).all(dim=-1, keepdim=True)
    return out.round_().clamp_(0, 255).to(torch.uint8).masked_fill_(background, 0)
