"""Test-time augmentation (TTA) over the dihedral group D4: the 4 rotations by 90° and the 4
mirror images of a square image.

A blood cell has no up, down, left or right, so each of the 8 views is as valid an input as the
original; :func:`cnmc.inference.forward.prob_all` averages the (temperature-scaled) softmax over them. It is off by
default everywhere: evaluation reports it beside plain inference (``test_tta`` in the metrics
file), and the served model applies it only when a request asks (``params: {"tta": true}``).
The decision threshold stays the one tuned on plain validation probabilities.
"""

from __future__ import annotations

import torch

# In the order tta_views returns them; view 0 is the plain input.
VIEW_NAMES = ("identity", "rot90", "rot180", "rot270", "hflip", "vflip", "transpose", "antitranspose")


def tta_views(batch: torch.Tensor) -> list[torch.Tensor]:
    """The 8 D4 transforms of an (N, C, H, W) batch of square images, identity first (``VIEW_NAMES``).

    Rotations are counter-clockwise in the (H, W) plane; ``hflip`` mirrors left-right, ``vflip``
    top-bottom, ``transpose`` swaps H and W (mirror on the main diagonal), ``antitranspose``
    mirrors on the other diagonal. Together they are all 8 elements of D4, each exactly once.
    """
    if batch.ndim != 4 or batch.shape[-1] != batch.shape[-2]:
        raise ValueError(f"need an (N, C, H, W) batch of square images, got shape {tuple(batch.shape)}")
    transposed = batch.transpose(-2, -1)
    return [
        batch,
        torch.rot90(batch, 1, dims=(-2, -1)),
        torch.rot90(batch, 2, dims=(-2, -1)),
        torch.rot90(batch, 3, dims=(-2, -1)),
        batch.flip(-1),
        batch.flip(-2),
        transposed,
        transposed.flip(-2, -1),
    ]
