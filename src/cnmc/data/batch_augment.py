"""Training-time augmentation that acts on whole uint8 batches: the paper's T drawn per image
(:class:`PaperBatchTransform`, online training), random symmetries and HED stain jitter.

The levers work on (B, H, W, 3) uint8 batches before normalisation, a few vectorised ops per batch, so
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
from torch.nn import functional
from torchvision.transforms.v2 import functional as F

from cnmc.data import transforms as T

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


class PaperBatchTransform:
    """The paper's T (:func:`cnmc.data.transforms.paper_transform`) drawn per image over a whole
    uint8 (B, 3, S, S) batch in a few vectorised passes: what online training applies every epoch.

    The per-image torchvision T costs about 10 ms a 128-px image on one CPU core, more than the
    training step itself, so online training ran at half the speed of a bare loop. Here every image
    still gets its own draw of every op, at the same magnitudes and probabilities, scaled by
    ``strength`` the same way, but the five geometric ops (flips, rotation, resized crop, affine,
    perspective) are composed into one homography per image and sampled once (one interpolation
    instead of four), colour jitter runs first (brightness, contrast, saturation, then hue as a turn
    in YIQ space, a linear stand-in for the HSV shift), and the 3x3 blur and the sharpness step run
    as grouped convolutions. Draws come from the torch global RNG, like torchvision's, or from
    ``generator``. The stored (paper, ``augment.online: false``) images keep the torchvision T.
    """

    def __init__(self, image_size: int, strength: float = 1.0, generator: torch.Generator | None = None):
        s = float(strength)
        if not 0.0 <= s <= 1.0 or math.isnan(s):
            raise ValueError(f"strength must be in [0, 1], got {strength!r}")
        self.size, self.strength, self.generator = int(image_size), s, generator
        self.flip_p = T.PAPER_HFLIP_P * s
        self.rotation = math.radians(T.PAPER_ROTATION_DEGREES * s)
        self.jitter = (T.PAPER_JITTER_BRIGHTNESS * s, T.PAPER_JITTER_CONTRAST * s, T.PAPER_JITTER_SATURATION * s)
        self.hue = T.PAPER_JITTER_HUE * s
        self.crop_scale = tuple(1.0 - (1.0 - b) * s for b in T.PAPER_CROP_SCALE)
        self.crop_ratio = tuple(1.0 - (1.0 - b) * s for b in T.PAPER_CROP_RATIO)
        self.translate = 2 * T.PAPER_AFFINE_TRANSLATE * s  # in the [-1, 1] frame
        self.affine_scale = tuple(1.0 - (1.0 - b) * s for b in T.PAPER_AFFINE_SCALE)
        self.shear = math.radians(T.PAPER_AFFINE_SHEAR_DEGREES * s)
        lo, hi = T.PAPER_BLUR_SIGMA
        self.blur_sigma = (lo, lo + (hi - lo) * s)
        self.sharpness_p, self.sharpness = T.PAPER_SHARPNESS_P * s, T.PAPER_SHARPNESS_FACTOR
        self.perspective_p, self.distortion = T.PAPER_PERSPECTIVE_P, T.PAPER_PERSPECTIVE_DISTORTION * s
        steps = (torch.arange(self.size, dtype=torch.float32) * 2 + 1) / self.size - 1  # pixel centres
        ys, xs = torch.meshgrid(steps, steps, indexing="ij")
        self._pixels = torch.stack([xs.flatten(), ys.flatten(), torch.ones(self.size**2)])  # (3, S * S)

    def _uniform(self, shape: tuple[int, ...], low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(shape, generator=self.generator)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        if batch.ndim != 4 or batch.shape[1] != 3 or batch.shape[2] != batch.shape[3]:
            raise ValueError(f"need a uint8 (B, 3, S, S) batch of square images, got {tuple(batch.shape)}")
        if self.strength == 0 and batch.shape[-1] == self.size:
            return batch
        x = self._colour(batch.to(torch.float32) / 255.0)
        x = functional.grid_sample(x, self._grid(len(x)), mode="bilinear", padding_mode="zeros", align_corners=False)
        x = self._sharpen(self._blur(x))
        return x.mul_(255.0).round_().clamp_(0, 255).to(torch.uint8)

    # -- colour --------------------------------------------------------------------------
    def _colour(self, x: torch.Tensor) -> torch.Tensor:
        """Brightness, contrast, saturation and hue composed into one affine colour map per image
        (``M x + offset``, clamped once at the end rather than after each step)."""
        n = len(x)
        brightness, contrast, saturation = (self._uniform((n, 1, 1), 1 - j, 1 + j) for j in self.jitter)
        luma = _LUMA.reshape(1, 1, 3)
        mean_grey = (x.mean(dim=(2, 3)) @ _LUMA.reshape(3, 1)).reshape(n, 1, 1)
        # brightness b, then contrast c about the image's mean grey, then saturation s about each pixel's grey
        matrix = brightness * contrast * (saturation * torch.eye(3) + (1 - saturation) * torch.ones(3, 1) @ luma)
        offset = ((1 - contrast) * brightness * mean_grey).expand(n, 3, 1)  # grey: kept by saturation
        if self.hue:
            angle = self._uniform((n,), -self.hue, self.hue) * 2 * math.pi
            turn = torch.zeros(n, 3, 3)
            turn[:, 0, 0] = 1
            turn[:, 1, 1], turn[:, 1, 2] = torch.cos(angle), -torch.sin(angle)
            turn[:, 2, 1], turn[:, 2, 2] = torch.sin(angle), torch.cos(angle)
            hue = RGB_FROM_YIQ @ turn @ YIQ_FROM_RGB  # RGB -> YIQ, turn I and Q, back
            matrix, offset = hue @ matrix, hue @ offset
        flat = torch.baddbmm(offset, matrix, x.reshape(n, 3, -1))
        return flat.clamp_(0, 1).reshape(x.shape)

    # -- geometry ------------------------------------------------------------------------
    def _grid(self, n: int) -> torch.Tensor:
        """Where each output pixel samples its input: flips, rotation, resized crop, affine and
        perspective composed as output-to-input maps on the [-1, 1] frame (align_corners=False)."""
        eye = torch.eye(3).expand(n, 3, 3)
        flips = eye.clone()
        flips[:, 0, 0] = torch.where(torch.rand(n, generator=self.generator) < self.flip_p, -1.0, 1.0)
        flips[:, 1, 1] = torch.where(torch.rand(n, generator=self.generator) < self.flip_p, -1.0, 1.0)
        angle = self._uniform((n,), -self.rotation, self.rotation)
        rotation = eye.clone()
        rotation[:, 0, 0], rotation[:, 0, 1] = torch.cos(angle), -torch.sin(angle)
        rotation[:, 1, 0], rotation[:, 1, 1] = torch.sin(angle), torch.cos(angle)
        inverse = flips @ rotation @ self._crop(n) @ torch.linalg.inv(self._affine(n)) @ self._perspective(n)
        mapped = inverse @ self._pixels  # (n, 3, S * S)
        return (mapped[:, :2] / mapped[:, 2:]).transpose(1, 2).reshape(n, self.size, self.size, 2)

    def _crop(self, n: int, tries: int = 10) -> torch.Tensor:
        """RandomResizedCrop's box (area share and log-uniform aspect, ten tries, else the frame) as
        the map from the crop's output to the frame."""
        area = self._uniform((n, tries), *self.crop_scale)
        log_lo, log_hi = math.log(self.crop_ratio[0]), math.log(self.crop_ratio[1])
        ratio = torch.exp(self._uniform((n, tries), log_lo, log_hi))
        width, height = torch.sqrt(area * ratio), torch.sqrt(area / ratio)
        fits = (width <= 1) & (height <= 1)
        first = fits.to(torch.int64).argmax(dim=1, keepdim=True)
        found = fits.any(dim=1)
        width = torch.where(found, width.gather(1, first).squeeze(1), 1.0)
        height = torch.where(found, height.gather(1, first).squeeze(1), 1.0)
        box = torch.eye(3).repeat(n, 1, 1)
        box[:, 0, 0], box[:, 1, 1] = width, height
        box[:, 0, 2] = (torch.rand(n, generator=self.generator) * 2 - 1) * (1 - width)
        box[:, 1, 2] = (torch.rand(n, generator=self.generator) * 2 - 1) * (1 - height)
        return box

    def _affine(self, n: int) -> torch.Tensor:
        """RandomAffine's forward map (scale, x-shear about the centre, then translation)."""
        scale = self._uniform((n,), *self.affine_scale)
        shear = torch.tan(self._uniform((n,), -self.shear, self.shear))
        forward = torch.eye(3).repeat(n, 1, 1)
        forward[:, 0, 0], forward[:, 0, 1], forward[:, 1, 1] = scale, scale * shear, scale
        forward[:, 0, 2] = self._uniform((n,), -self.translate, self.translate)
        forward[:, 1, 2] = self._uniform((n,), -self.translate, self.translate)
        return forward

    def _perspective(self, n: int) -> torch.Tensor:
        """RandomPerspective: each corner moved inward by up to ``distortion`` of the half side, the
        homography from the moved corners back to the frame's (identity where not drawn)."""
        corners = torch.tensor([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]]).expand(n, 4, 2)
        inward = -corners * self._uniform((n, 4, 2), 0.0, self.distortion)
        drawn = (torch.rand(n, generator=self.generator) < self.perspective_p).reshape(n, 1, 1)
        moved = corners + inward * drawn
        return _homography(moved, corners)

    # -- filters -------------------------------------------------------------------------
    def _blur(self, x: torch.Tensor) -> torch.Tensor:
        """The 3x3 Gaussian blur, each image at its own sigma (separable, reflected edges, as torchvision)."""
        sigma = self._uniform((len(x), 1, 1, 1), *self.blur_sigma)
        side = torch.exp(-1 / (2 * sigma**2))  # the outer taps' weight against the centre's 1
        outer, centre = side / (1 + 2 * side), 1 / (1 + 2 * side)
        padded = functional.pad(x, (1, 1, 0, 0), mode="reflect")
        x = centre * x + outer * (padded[..., :-2] + padded[..., 2:])
        padded = functional.pad(x, (0, 0, 1, 1), mode="reflect")
        return centre * x + outer * (padded[..., :-2, :] + padded[..., 2:, :])

    def _sharpen(self, x: torch.Tensor) -> torch.Tensor:
        """RandomAdjustSharpness: torchvision's smoothing (a 3x3 box with the centre weighted 5, over 13)
        inside the border, blended at the factor, on the images drawn."""
        drawn = (torch.rand(len(x), generator=self.generator) < self.sharpness_p).nonzero().flatten()
        if not len(drawn):
            return x
        picked = x[drawn]
        rows = picked[..., :-2, :] + picked[..., 1:-1, :] + picked[..., 2:, :]
        box = rows[..., :-2] + rows[..., 1:-1] + rows[..., 2:]
        smooth = picked.clone()
        smooth[..., 1:-1, 1:-1] = (box + 4 * picked[..., 1:-1, 1:-1]) / 13
        x[drawn] = (self.sharpness * picked + (1 - self.sharpness) * smooth).clamp_(0, 1)
        return x


# ITU-R BT.601 luma weights (torchvision's rgb_to_grayscale) and the YIQ transform hue turns in.
_LUMA = torch.tensor([0.299, 0.587, 0.114]).reshape(1, 3, 1, 1)
YIQ_FROM_RGB = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
RGB_FROM_YIQ = torch.linalg.inv(YIQ_FROM_RGB)


def _homography(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The (n, 3, 3) homographies taking each of the 4 ``source`` points to its ``target`` (n, 4, 2)."""
    x, y = source[..., 0], source[..., 1]
    u, v = target[..., 0], target[..., 1]
    zeros, ones = torch.zeros_like(x), torch.ones_like(x)
    rows_u = torch.stack([x, y, ones, zeros, zeros, zeros, -u * x, -u * y], dim=-1)
    rows_v = torch.stack([zeros, zeros, zeros, x, y, ones, -v * x, -v * y], dim=-1)
    system = torch.cat([rows_u, rows_v], dim=1)  # (n, 8, 8)
    solution = torch.linalg.solve(system, torch.cat([u, v], dim=1))
    return torch.cat([solution, torch.ones(len(source), 1)], dim=1).reshape(-1, 3, 3)
