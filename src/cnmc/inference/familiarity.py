"""How unlike its training cells a model finds a cell: the out-of-distribution score.

A classifier answers about anything, a black frame or another lab's cells included, and its
softmax is no guide to when it should not. Each model therefore carries a picture of the cells it
was trained on: the class means and one shared covariance of its pooled penultimate features (the
class-conditional Gaussian of Lee et al. 2018, with Ledoit-Wolf shrinkage because a model has
more features than a person has cells). A cell's distance is its squared Mahalanobis distance to
the nearer class mean.

:func:`cnmc.training.familiarity.fit_familiarity` fits it when the model is evaluated; the cut-off
is set on people the model did not train on (the fold it left out under cross-fitting, validation
under holdout): the distance that ``FALSE_ALARM_RATE`` of their cells
exceed. A cell's ``ood_score`` is its distance over that cut-off, averaged over the models that
answer (a cross-fit's folds), so 1 is the cut-off whatever the model, and ``ood`` is
``ood_score > 1``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

FALSE_ALARM_RATE = 0.02  # share of unseen training-distribution cells the cut-off flags
FILE_NAME = "familiarity.npz"


@dataclass(frozen=True)
class Familiarity:
    """One model's training cells, as its features see them, and its cut-off."""

    means: NDArray[np.float64]  # (classes, D)
    precision: NDArray[np.float64]  # (D, D): the inverse of the shrunk within-class covariance
    cutoff: float  # the distance that FALSE_ALARM_RATE of unseen people's cells exceed
    # Nearly every training cell was segmented on black (cnmc.data.quality): an image that is not is
    # flagged whatever its distance (another lab's unsegmented crops, a page of text).
    segmented: bool = False

    def distance(self, features: NDArray) -> NDArray[np.float64]:
        """Each (N, D) feature row's squared Mahalanobis distance to the nearer class mean."""
        x = np.asarray(features, dtype=np.float64)
        per_class = []
        for mean in self.means:
            centred = x - mean
            per_class.append(np.einsum("nd,nd->n", centred @ self.precision, centred))
        return np.min(per_class, axis=0)

    def score(self, features: NDArray) -> NDArray[np.float64]:
        """The distance over the cut-off: above 1 is unlike the training cells."""
        return self.distance(features) / self.cutoff

    def save(self, path: Path) -> None:
        np.savez(
            path,
            means=self.means.astype(np.float32),
            precision=self.precision.astype(np.float32),
            cutoff=np.float64(self.cutoff),
            segmented=np.bool_(self.segmented),
        )

    @classmethod
    def load(cls, path: Path) -> Familiarity:
        with np.load(path, allow_pickle=False) as saved:
            segmented = bool(saved["segmented"]) if "segmented" in saved.files else False
            return cls(
                saved["means"].astype(np.float64),
                saved["precision"].astype(np.float64),
                float(saved["cutoff"]),
                segmented,
            )


SEGMENTED_SHARE = 0.95  # of the training cells segmented on black, for Familiarity.segmented


def ensemble_score(scores: list[NDArray]) -> NDArray[np.float64]:
    """The ``ood_score`` of cells answered by several models: the mean of their scores."""
    return np.mean(np.asarray(scores, dtype=np.float64), axis=0)


GATE_SCORE = 2.0  # the least ood_score of a cell the quality gate flags: twice the cut-off


def gated_score(score: NDArray, flagged_by_gate: NDArray) -> NDArray[np.float64]:
    """The ``ood_score`` a cell is answered with: its features' score, raised to at least
    :data:`GATE_SCORE` where the quality gate flags it (not a cell, or not segmented on black where
    every training cell was), so that a score above 1 always means flagged and the score alone ranks
    what the gate caught above every cell the features pass. NaN (no familiarity) stays NaN
    unless the gate flags the cell."""
    return np.where(flagged_by_gate, np.fmax(np.asarray(score, dtype=np.float64), GATE_SCORE), score)
