"""Temperature scaling (Guo et al. 2017) and the calibration measures that judge it.

One scalar ``T > 0`` divides the logits before the softmax: ``softmax(z / T)``. It is fitted by
minimising the negative log-likelihood on the VALIDATION logits; it never changes which class
has the larger logit, so accuracy at 0.5 and ROC AUC stay as they are, only the probabilities
become more (T < 1) or less (T > 1) confident. The served model applies the same ``T``
(``ModelSpec.temperature``, see :func:`cnmc.inference.forward.prob_all`).

Convention as in :mod:`cnmc.metrics.scores`: class 1 = ALL, ``prob_all`` = P(ALL).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.optimize import minimize_scalar
from scipy.special import logsumexp

log = logging.getLogger(__name__)

# Search range of T. A model no better than chance drives the optimum towards T -> inf (every
# probability 0.5), nearly separable data towards T -> 0; the bounds stop both, and a fit that
# lands on one is logged as a warning. Separable data are not fitted at all (see fit_temperature).
T_MIN, T_MAX = 0.05, 20.0


def _logits_targets(logits: ArrayLike, targets: ArrayLike) -> tuple[NDArray[np.float64], NDArray[np.int64]]:
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(targets).ravel()
    if z.ndim != 2 or z.shape[0] == 0 or z.shape[0] != y.size:
        raise ValueError(f"need logits of shape (N, C) and N targets (got {z.shape} and {y.size})")
    if not np.isfinite(z).all():
        raise ValueError("logits must be finite")
    if not np.isin(y, np.arange(z.shape[1])).all():
        raise ValueError(f"targets must be class indices 0..{z.shape[1] - 1}")
    return z, y.astype(np.int64)


def nll(logits: ArrayLike, targets: ArrayLike, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood (cross-entropy, nats) of ``softmax(logits / temperature)``."""
    return float(np.mean(cell_nll(logits, targets, temperature)))


def cell_nll(logits: ArrayLike, targets: ArrayLike, temperature: float = 1.0) -> NDArray[np.float64]:
    """Each cell's negative log-likelihood of ``softmax(logits / temperature)``."""
    z, y = _logits_targets(logits, targets)
    scaled = z / temperature
    return logsumexp(scaled, axis=1) - scaled[np.arange(y.size), y]


def fit_temperature(logits: ArrayLike, targets: ArrayLike) -> float:
    """The ``T`` in [``T_MIN``, ``T_MAX``] that minimises :func:`nll` on these (validation) data.

    The NLL is convex in ``1/T``, so a bounded scalar search over ``log T`` finds the global
    optimum. Feed it VALIDATION logits only, never test logits.

    When the predicted class is right for every cell, the NLL falls towards 0 as T -> 0 and the
    data support no temperature at all; fitting would return the lower bound and make the model
    wildly overconfident on new data (the demo's 56 test cells: NLL 0.12 -> 0.50). Then T = 1:
    the logits are left as trained, with a warning.
    """
    z, y = _logits_targets(logits, targets)
    if np.all(np.argmax(z, axis=1) == y):
        log.warning("every validation cell is classified right: no temperature can be fitted, T = 1")
        return 1.0
    result = minimize_scalar(
        lambda log_t: nll(z, y, float(np.exp(log_t))),
        bounds=(np.log(T_MIN), np.log(T_MAX)),
        method="bounded",
        options={"xatol": 1e-6},
    )
    temperature = float(np.exp(result.x))
    if temperature <= T_MIN * 1.001:
        log.warning(
            "temperature %.3g hit the lower bound %g: validation data too few or separable for temperature scaling",
            temperature,
            T_MIN,
        )
    elif temperature >= T_MAX * 0.999:
        log.warning(
            "temperature %.3g hit the upper bound %g: on validation, the model is hardly better than chance",
            temperature,
            T_MAX,
        )
    return temperature


@dataclass(frozen=True)
class ReliabilityBins:
    """Top-label reliability statistics per confidence bin (empty bins have count 0, NaN means)."""

    edges: NDArray[np.float64]  # n_bins + 1 edges over [0, 1]; bin k is (edges[k], edges[k+1]]
    count: NDArray[np.int64]
    confidence: NDArray[np.float64]  # mean confidence of the bin's cells
    accuracy: NDArray[np.float64]  # share of the bin's cells whose predicted class is right


def reliability_bins(y_true: ArrayLike, prob_all: ArrayLike, n_bins: int = 15) -> ReliabilityBins:
    """Bin cells by top-label confidence ``max(p, 1 - p)``; the predicted class is ALL when p >= 0.5."""
    y = np.asarray(y_true).ravel().astype(np.int64)
    p = np.asarray(prob_all, dtype=np.float64).ravel()
    if y.size == 0 or y.size != p.size:
        raise ValueError(f"need equally long, non-empty labels and probabilities (got {y.size}, {p.size})")
    if n_bins < 1:
        raise ValueError("n_bins must be at least 1")
    predicted = (p >= 0.5).astype(np.int64)
    confidence = np.where(predicted == 1, p, 1 - p)
    correct = (predicted == y).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)
    count = np.bincount(which, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(which, confidence, minlength=n_bins) / count
        accuracy = np.bincount(which, correct, minlength=n_bins) / count
    return ReliabilityBins(edges, count, mean_conf, accuracy)


def expected_calibration_error(y_true: ArrayLike, prob_all: ArrayLike, n_bins: int = 15) -> float:
    """Standard top-label ECE: ``sum_b |B|/N * |accuracy(B) - confidence(B)|``.

    Computed on the confidence of the PREDICTED class, ``max(p, 1 - p)`` with ALL predicted when
    ``prob_all >= 0.5`` (the argmax rule, not the tuned threshold), in ``n_bins`` equal-width bins
    over [0, 1] (bin k is (k/n, (k+1)/n]; binary confidences fill only the upper half).
    """
    bins = reliability_bins(y_true, prob_all, n_bins)
    used = bins.count > 0
    gaps = np.abs(bins.accuracy[used] - bins.confidence[used])
    return float(np.sum(bins.count[used] * gaps) / bins.count.sum())
