"""The one inference path: logits of a model over uint8 image batches.

Validation during training, evaluation (plain and with test-time augmentation), the served
model, ``cnmc predict`` and ``cnmc explain`` all call :func:`predict_outputs`, so a cell gets the
same number wherever it is scored. Batches stay uint8 until they reach the model's device (a
quarter of float32's bytes over the bus), where :func:`model_input` normalises them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from numpy.typing import ArrayLike, NDArray

from cnmc.data.transforms import FOREGROUND_LEVEL

# An optional map from a normalised batch to its views (e.g. cnmc.inference.tta.tta_views); view 0 is the batch.
Views = Callable[[torch.Tensor], list[torch.Tensor]]
# How a model sees colour (train.colour, recorded in ModelSpec.colour): as is, each cell's mean
# colour removed, or grey. Training, evaluation and serving all apply it here.
Colour = Literal["rgb", "centred", "grey"]
GREY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R 601 luma


def recolour(x: torch.Tensor, colour: Colour, mean: Sequence[float]) -> torch.Tensor:
    """Float (B, 3, H, W) images in uint8 units, recoloured as ``colour`` says (in place where it can).

    ``centred`` (Pan et al., the ISBI 2019 winner): each cell's foreground pixels are shifted so that
    their mean colour is the normalisation ``mean``, which normalisation then maps to zero, so a
    donor's stain tint is gone before the model sees the cell; the black background stays black.
    ``grey``: the luma in all three channels.
    """
    if colour == "rgb":
        return x
    if colour == "grey":
        weights = torch.tensor(GREY_WEIGHTS, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return (x * weights).sum(dim=1, keepdim=True).expand_as(x).contiguous(memory_format=_format_of(x))
    cell = (x.amax(dim=1, keepdim=True) > FOREGROUND_LEVEL).to(x.dtype)
    pixels = cell.sum(dim=(2, 3), keepdim=True).clamp_min(1.0)
    cell_mean = (x * cell).sum(dim=(2, 3), keepdim=True) / pixels
    target = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1) * 255.0
    return x.add_(cell * (target - cell_mean))


def _format_of(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format


def model_input(
    images: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device,
    channels_last: bool = False,
    colour: Colour = "rgb",
) -> torch.Tensor:
    """uint8 (B, H, W, 3) host batch -> float32 (B, 3, H, W) on ``device``: :func:`recolour`, then
    ``(x / 255 - mean) / std``."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 (B, H, W, 3), got {images.dtype} {tuple(images.shape)}")
    x = images.to(device, non_blocking=True).permute(0, 3, 1, 2)
    std_t = torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    mean_t = torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    out = recolour(x.to(torch.float32, memory_format=memory_format), colour, mean)
    return out.mul_(1.0 / (255.0 * std_t)).add_(-mean_t / std_t)


def autocast(device: torch.device, dtype: torch.dtype | None) -> torch.autocast:
    """Mixed precision on ``device`` when ``dtype`` is given (bf16/fp16), else a no-op context."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


@dataclass(frozen=True)
class Outputs:
    """What one pass of a model over images gives: the logits, (N, 2) or (N, V, 2) with views, and
    the pooled penultimate features of the plain view, (N, D), which say how familiar a cell looks
    (:mod:`cnmc.inference.familiarity`)."""

    logits: NDArray[np.float32]
    features: NDArray[np.float32]


def _logits_and_features(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A timm classifier's logits and the pooled features its head reads (``pre_logits``)."""
    timm_model: Any = model  # timm's API: forward_features, forward_head, get_classifier
    features = timm_model.forward_head(timm_model.forward_features(x), pre_logits=True)
    return timm_model.get_classifier()(features), features


@torch.no_grad()
def predict_outputs(
    model: torch.nn.Module,
    batches: Iterable[torch.Tensor],
    mean: Sequence[float],
    std: Sequence[float],
    views: Views | None = None,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    colour: Colour = "rgb",
) -> Outputs:
    """Float32 logits and features of every image, in order (:class:`Outputs`).

    ``batches``: uint8 (B, H, W, 3) tensors. The model runs in eval mode on its own device (its
    mode is restored after); one forward pass per view keeps the memory of one batch.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    logits, features = [], []
    try:
        for images in batches:
            x = model_input(images, mean, std, device, channels_last, colour)
            per_view = []
            for k, view in enumerate(views(x) if views else [x]):
                with autocast(device, amp_dtype):
                    if k == 0:
                        out, pooled = _logits_and_features(model, view)
                        features.append(pooled.float().cpu().numpy())
                    else:
                        out = model(view)
                per_view.append(out.float())
            logits.append((torch.stack(per_view, dim=1) if views else per_view[0]).cpu().numpy())
    finally:
        model.train(was_training)
    if logits:
        return Outputs(np.concatenate(logits), np.concatenate(features))
    n_views = len(views(torch.zeros(1, 3, 2, 2))) if views else 0
    empty = np.empty((0, n_views, 2) if views else (0, 2), dtype=np.float32)
    timm_model: Any = model
    return Outputs(empty, np.empty((0, int(timm_model.num_features)), dtype=np.float32))


def prob_all(logits: ArrayLike, temperature: float = 1.0) -> NDArray[np.float64]:
    """P(ALL) = ``softmax(logits / temperature)[..., 1]`` of (N, 2) logits, or its mean over the
    views of (N, V, 2) logits (the TTA average)."""
    scaled = np.asarray(logits, dtype=np.float64) / temperature
    scaled -= scaled.max(axis=-1, keepdims=True)
    exp = np.exp(scaled)
    p = exp[..., 1] / exp.sum(axis=-1)
    return p.mean(axis=1) if p.ndim == 2 else p


def array_batches(images: np.ndarray, batch_size: int) -> Iterable[torch.Tensor]:
    """A uint8 (N, S, S, 3) array as tensors of ``batch_size`` images (no copy)."""
    for start in range(0, len(images), batch_size):
        yield torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size]))
