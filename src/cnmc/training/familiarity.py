"""Fitting a model's familiarity (:mod:`cnmc.inference.familiarity`) at evaluation time, apart from
the served code, which only reads it (scikit-learn stays out of the served model's requirements)."""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray
from sklearn.covariance import LedoitWolf

from cnmc.inference.familiarity import FALSE_ALARM_RATE, SEGMENTED_SHARE, Familiarity


def fit_familiarity(features: NDArray, targets: NDArray, unseen: NDArray, segmented_share: float = 0.0) -> Familiarity:
    """The picture of training cells ``features`` (N, D) of classes ``targets``, with the cut-off
    set on ``unseen`` (M, D), cells of people these were not trained on; ``segmented_share``: the
    share of those training images segmented on black (:func:`cnmc.data.quality.segmented_on_black`)."""
    x, y = np.asarray(features, dtype=np.float64), np.asarray(targets)
    classes = np.unique(y)
    means = np.stack([x[y == c].mean(axis=0) for c in classes])
    centred = x - means[np.searchsorted(classes, y)]
    precision = LedoitWolf(assume_centered=True).fit(centred).precision_
    partial = Familiarity(means, precision, 1.0)
    cutoff = float(np.quantile(partial.distance(unseen), 1 - FALSE_ALARM_RATE))
    segmented = segmented_share >= SEGMENTED_SHARE
    return Familiarity(means, precision, max(cutoff, np.finfo(np.float64).tiny), segmented)
