"""P(ALL) for a batch of cells, the one way every caller computes it: evaluation, serving,
ensembles and Grad-CAM's choice of class."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from cnmc.inference.forward import array_batches, predict_outputs, prob_all
from cnmc.inference.spec import ModelSpec
from cnmc.inference.tta import tta_views

BATCH_SIZE = 32


@dataclass(frozen=True)
class CellOutputs:
    prob: np.ndarray  # (N,) P(ALL)
    features: np.ndarray  # (N, D) pooled penultimate features of the plain view


def predict_cells(model: torch.nn.Module, images: np.ndarray, spec: ModelSpec, tta: bool | None = None) -> CellOutputs:
    """Probability of ALL for a uint8 (N, S, S, 3) batch on the model's device,
    ``softmax(logits / spec.temperature)`` (with ``tta``, default the model's own ``spec.tta``, its
    mean over the 8 D4 views), and the features the model's familiarity reads."""
    tta = spec.tta if tta is None else tta
    outputs = predict_outputs(
        model,
        array_batches(images, BATCH_SIZE),
        spec.mean,
        spec.std,
        views=tta_views if tta else None,
        colour=spec.colour,
    )
    return CellOutputs(prob_all(outputs.logits, spec.temperature), outputs.features)


def predict_proba(model: torch.nn.Module, images: np.ndarray, spec: ModelSpec, tta: bool | None = None) -> np.ndarray:
    """The P(ALL) of :func:`predict_cells`."""
    return predict_cells(model, images, spec, tta).prob
