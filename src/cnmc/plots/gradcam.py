"""Grad-CAM explanations: where in a cell the classifier looked for its decision.

Grad-CAM (Selvaraju et al., 2017) weights the last convolutional feature map by the gradient of
a class logit, sums over channels and keeps the positive part; upsampled to the image, it shows
the regions that raised that class's score. Computed with Captum's ``LayerGradCam`` on the layer
that :func:`target_layer` picks for each backbone, for the class the model predicts at the run's
decision threshold (so a cell called Hem shows the evidence for Hem).

Three uses:

* :func:`gradcam_examples_png` (drawn by the evaluate stage, which logs it with the run's plots): a
  grid of test cells, ALL and Hem, correctly and wrongly classified (:func:`select_examples`), as one PNG;
* :func:`single_png`, one overlay PNG per image file, which :func:`cnmc.jobs.explain.explain_images`
  (``cnmc explain --model URI IMAGE...``) draws for a logged or registered pyfunc model;
* :func:`gradcam_heatmaps` and :func:`gradcam_grid` for anything else.

Figures use ``matplotlib.figure.Figure`` (Agg canvas, no pyplot state), like :mod:`cnmc.plots.evaluation`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from cnmc.core.atomic import atomic_write_png
from cnmc.core.errors import CnmcError
from cnmc.inference.probability import BATCH_SIZE, predict_proba
from cnmc.inference.spec import ModelSpec

log = logging.getLogger(__name__)

# (label, correct) groups of select_examples, in display order.
GROUPS = (("all", True), ("all", False), ("hem", True), ("hem", False))
CLASS_NAMES = {1: "ALL", 0: "Hem"}
OVERLAY_ALPHA = 0.45
COLORMAP = "jet"
GRID_COLUMNS = 4


# -- which layer ------------------------------------------------------------------------------
def target_layer(model: torch.nn.Module) -> torch.nn.Module:
    """The last convolutional block of a supported backbone (the Grad-CAM layer).

    timm ResNets (``resnet50``, ``resnet101``, ``test_resnet``): ``layer4[-1]``, the last residual
    block. timm EfficientNets (``efficientnet_b*``, ``tf_efficientnet_lite0``, ``test_efficientnet``):
    ``bn2``, the batch norm and activation that follow ``conv_head`` (the activated output of the
    last 1x1 convolution, right before global pooling). Anything else: :class:`CnmcError`.
    """
    model = getattr(model, "_orig_mod", model)  # a torch.compile wrapper
    layer4 = getattr(model, "layer4", None)
    if isinstance(layer4, torch.nn.Sequential) and len(layer4) and hasattr(model, "fc"):
        return layer4[-1]
    if isinstance(getattr(model, "conv_head", None), torch.nn.Conv2d) and hasattr(model, "blocks"):
        bn2 = getattr(model, "bn2", None)
        return bn2 if isinstance(bn2, torch.nn.Module) else model.conv_head  # type: ignore[return-value]
    raise CnmcError(
        f"Grad-CAM: no target layer known for {type(model).__name__} (supported: timm ResNets, whose "
        "last block is model.layer4[-1], and timm EfficientNets, whose head is model.conv_head/bn2)"
    )


# -- heatmaps ---------------------------------------------------------------------------------
def gradcam_heatmaps(
    model: torch.nn.Module,
    spec: ModelSpec,
    images: np.ndarray,
    targets: Sequence[int] | np.ndarray | None = None,
) -> np.ndarray:
    """Grad-CAM maps for a uint8 (N, S, S, 3) batch: float32 (N, S, S), each scaled to [0, 1].

    ``targets``: the class (1 = ALL, 0 = Hem) to explain per image; default: the class predicted
    at ``spec.threshold``. A map with no positive evidence is all zeros. The model's train/eval
    mode and weights are left as they were.
    """
    from captum.attr import LayerAttribution, LayerGradCam

    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 (N, S, S, 3) images, got {images.dtype} {images.shape}")
    if not images.flags.writeable:  # e.g. a store's read-only memmap: torch wants writable memory
        images = images.copy()
    if not len(images):
        return np.zeros((0, *images.shape[1:3]), dtype=np.float32)
    if targets is None:
        targets = (predict_proba(model, images, spec) >= spec.threshold).astype(np.int64)
    targets = np.asarray(targets, dtype=np.int64)
    if targets.shape != (len(images),):
        raise ValueError(f"expected {len(images)} targets, got shape {targets.shape}")

    from cnmc.inference.forward import model_input

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    cam = LayerGradCam(model, target_layer(model))
    out = []
    try:
        with torch.enable_grad():
            for start in range(0, len(images), BATCH_SIZE):
                chunk = images[start : start + BATCH_SIZE]
                batch = model_input(torch.from_numpy(chunk), spec.mean, spec.std, device, colour=spec.colour)
                batch = batch.requires_grad_(True)
                target = torch.from_numpy(targets[start : start + BATCH_SIZE]).to(device)
                attr = cam.attribute(batch, target=target, relu_attributions=True)
                attr = LayerAttribution.interpolate(attr.detach(), tuple(chunk.shape[1:3]), "bilinear")
                out.append(attr[:, 0].float().cpu().numpy())
    finally:
        model.train(was_training)
        model.zero_grad(set_to_none=True)
    return normalize_maps(np.concatenate(out))


def normalize_maps(maps: np.ndarray) -> np.ndarray:
    """Each map clipped at 0 and divided by its maximum (all-zero maps stay zero), float32."""
    maps = np.nan_to_num(np.clip(np.asarray(maps, dtype=np.float32), 0.0, None))
    peak = maps.reshape(len(maps), -1).max(axis=1) if len(maps) else np.zeros(0, np.float32)
    scale = np.where(peak > 0, peak, 1.0).astype(np.float32)
    return np.clip(maps / scale[:, None, None], 0.0, 1.0)


def overlay(image: np.ndarray, heatmap: np.ndarray, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """The heatmap (colour-mapped, ``jet``) blended onto a uint8 (S, S, 3) image: uint8 (S, S, 3)."""
    colour = colormaps[COLORMAP](np.clip(heatmap, 0.0, 1.0))[..., :3]
    blended = (1.0 - alpha) * (np.asarray(image, dtype=np.float32) / 255.0) + alpha * colour
    return np.clip(np.rint(blended * 255.0), 0, 255).astype(np.uint8)


# -- figures ----------------------------------------------------------------------------------
def gradcam_grid(
    model: torch.nn.Module,
    spec: ModelSpec,
    images: np.ndarray,
    labels: Sequence[Any],
    probs: Sequence[float] | np.ndarray,
    path: Path | str,
    title: str,
    threshold: float | None = None,
    groups: Sequence[str] | None = None,
) -> Path:
    """A grid PNG: per image, the cell and its Grad-CAM overlay side by side, with a caption
    (true label, ``prob_all``, correct/wrong at ``threshold``, default ``spec.threshold``).

    ``labels``: true labels, ``"all"``/``"hem"`` or 1/0. ``groups``: optional per-panel headings
    (e.g. "ALL, correct"). The PNG's text chunk ``panels`` holds the number of panels.
    """
    images = np.asarray(images)
    probs = np.asarray(probs, dtype=np.float64)
    truth = np.array([_target(label) for label in labels], dtype=np.int64)
    if not (len(images) == len(truth) == len(probs)):
        raise ValueError(f"{len(images)} images, {len(truth)} labels and {len(probs)} probs: lengths differ")
    threshold = spec.threshold if threshold is None else float(threshold)
    predicted = (probs >= threshold).astype(np.int64)
    maps = gradcam_heatmaps(model, spec, images, targets=predicted)

    n = len(images)
    cols = max(1, min(GRID_COLUMNS, n))
    rows = max(1, -(-n // cols))
    fig = Figure(figsize=(3.3 * cols, 2.4 * rows + 0.6))
    fig.suptitle(title, fontsize=11)
    for i in range(rows * cols):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.set_axis_off()
        if i >= n:
            continue
        ax.imshow(np.concatenate([images[i], overlay(images[i], maps[i])], axis=1), interpolation="nearest")
        verdict = "correct" if predicted[i] == truth[i] else "WRONG"
        heading = f"{groups[i]}\n" if groups is not None else ""
        ax.set_title(
            f"{heading}true {CLASS_NAMES[truth[i]]} | p(ALL) {probs[i]:.2f} | {verdict}\n"
            f"Grad-CAM of {CLASS_NAMES[predicted[i]]}",
            fontsize=8,
            color="black" if predicted[i] == truth[i] else "firebrick",
        )
    if n == 0:
        fig.text(0.5, 0.5, "no test cells to show", ha="center", va="center")
    fig.tight_layout()
    _colour_bar(fig)
    return atomic_write_png(fig, path, {"panels": str(n), "Title": title}, tight=False)


def _colour_bar(fig: Figure) -> None:
    """The overlay's scale, once for the figure, in a strip at its right edge."""
    fig.subplots_adjust(right=0.9)
    strip = fig.add_axes((0.92, 0.15, 0.015, 0.7))
    bar = fig.colorbar(ScalarMappable(Normalize(0.0, 1.0), colormaps[COLORMAP]), cax=strip)
    bar.set_label("Grad-CAM (share of the cell's peak)", fontsize=8)
    bar.ax.tick_params(labelsize=7)


def select_examples(
    index_df: pd.DataFrame,
    probs: Sequence[float] | np.ndarray,
    threshold: float,
    per_group: int = 2,
    seed: int = 0,
) -> pd.DataFrame:
    """A fixed, seeded sample of cells: up to ``per_group`` each of ALL correct, ALL wrong,
    Hem correct, Hem wrong (fewer where a group has fewer cells).

    ``index_df``: one row per image, with a ``label`` (``all``/``hem``) or ``target`` (1/0) column,
    in the order of ``probs``. Returns one row per chosen cell, in group order: ``row`` (position
    in ``index_df``), ``group``, ``label``, ``prob_all``, ``predicted``, ``correct``. The same
    inputs and seed always give the same rows.
    """
    probs = np.asarray(probs, dtype=np.float64)
    if len(index_df) != len(probs):
        raise ValueError(f"index has {len(index_df)} rows but there are {len(probs)} probabilities")
    if per_group < 0:
        raise ValueError(f"per_group must be >= 0, got {per_group}")
    if "label" in index_df.columns:
        truth = np.array([_target(v) for v in index_df["label"]], dtype=np.int64)
    elif "target" in index_df.columns:
        truth = np.array([_target(v) for v in index_df["target"]], dtype=np.int64)
    else:
        raise ValueError("index needs a 'label' (all/hem) or 'target' (1/0) column")
    predicted = (probs >= threshold).astype(np.int64)
    rng = np.random.default_rng(seed)
    chosen: list[dict[str, Any]] = []
    for label, correct in GROUPS:
        mask = (truth == (1 if label == "all" else 0)) & ((predicted == truth) == correct)
        rows = np.flatnonzero(mask)
        take = min(per_group, len(rows))
        picked = np.sort(rng.choice(rows, size=take, replace=False)) if take else rows[:0]
        name = f"{CLASS_NAMES[1 if label == 'all' else 0]}, {'correct' if correct else 'wrong'}"
        chosen.extend(
            {
                "row": int(r),
                "group": name,
                "label": label,
                "prob_all": float(probs[r]),
                "predicted": "all" if predicted[r] else "hem",
                "correct": bool(correct),
            }
            for r in picked
        )
    return pd.DataFrame(chosen, columns=["row", "group", "label", "prob_all", "predicted", "correct"])


def gradcam_examples_png(
    model: torch.nn.Module,
    spec: ModelSpec,
    test_store: Any,
    test_prob: Sequence[float] | np.ndarray,
    threshold: float,
    out_png: Path | str,
    per_group: int = 2,
    seed: int = 0,
) -> Path | None:
    """The run's Grad-CAM grid: :func:`select_examples` of the test split, drawn by :func:`gradcam_grid`.

    ``test_store``: the test :class:`cnmc.data.store.ImageStore` (``index`` and ``images``), in the
    order of ``test_prob``. Writes ``out_png`` and returns it (the caller logs it). A backbone whose
    Grad-CAM layer is unknown gets a warning and no grid (None): an explanation is never worth a
    failed evaluation.
    """
    try:
        target_layer(model)
    except CnmcError as exc:
        log.warning("no Grad-CAM grid: %s", exc)
        return None
    picks = select_examples(test_store.index, test_prob, threshold, per_group=per_group, seed=seed)
    rows = picks["row"].to_numpy(dtype=np.int64)
    images = np.asarray(test_store.images[rows]) if len(rows) else np.zeros((0, 1, 1, 3), np.uint8)
    title = f"{spec.backbone}: Grad-CAM on test cells (threshold {threshold:.2f}; left cell, right overlay)"
    return gradcam_grid(
        model,
        spec,
        images,
        list(picks["label"]),
        picks["prob_all"].to_numpy(),
        out_png,
        title,
        threshold=threshold,
        groups=list(picks["group"]),
    )


def single_png(image: np.ndarray, heatmap: np.ndarray, path: Path, name: str, prob: float, spec: ModelSpec) -> Path:
    predicted = CLASS_NAMES[int(prob >= spec.threshold)]
    fig = Figure(figsize=(6.4, 3.6))
    for i, (picture, caption) in enumerate(
        ((image, "cell (as the model sees it)"), (overlay(image, heatmap), f"Grad-CAM of {predicted}"))
    ):
        ax = fig.add_subplot(1, 2, i + 1)
        ax.imshow(picture, interpolation="nearest")
        ax.set_title(caption, fontsize=9)
        ax.set_axis_off()
    fig.suptitle(
        f"{name}: {predicted}, p(ALL) {prob:.3f} (threshold {spec.threshold:.2f}, {spec.backbone})", fontsize=10
    )
    fig.tight_layout()
    _colour_bar(fig)
    return atomic_write_png(
        fig, path, {"prob_all": f"{prob:.6f}", "label": predicted.lower(), "Title": name}, tight=False
    )


def _target(value: Any) -> int:
    text = str(value).strip().lower()
    if text in ("all", "1"):
        return 1
    if text in ("hem", "0"):
        return 0
    raise ValueError(f"unknown label {value!r}: expected all/hem or 1/0")
