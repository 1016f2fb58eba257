"""The metrics registry: every scalar ALL-vs-Hem metric once, with its display label, its direction,
the function that computes it, where it is shown, and the MLflow key it is logged under.

Evaluation computes through it (each metric, and its bootstrap interval, from confusion counts or
from the scores), the report, the model card, the bar chart and the headline file show the metrics
whose ``shown_in`` names them, in the registry's order, promotion ranks by it, and ``params.yaml`` is
checked against it when it loads (so it imports only numpy). Adding a metric is one entry here.
Convention: ALL = 1 is the positive class, Hem = 0.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from numpy.typing import NDArray

Array = NDArray[np.float64]


class Counts(NamedTuple):
    """Confusion counts, each an array: one entry per confusion matrix (vectorised bootstrap)."""

    tp: Array
    fp: Array
    tn: Array
    fn: Array


def safe_divide(num: Array, den: Array) -> Array:
    """num / den with 0 where den is 0 (sklearn's zero_division=0)."""
    return np.divide(num, den, out=np.zeros(np.broadcast(num, den).shape), where=den > 0)


def _recall_all(c: Counts) -> Array:
    return safe_divide(c.tp, c.tp + c.fn)


def _recall_hem(c: Counts) -> Array:
    return safe_divide(c.tn, c.tn + c.fp)


def _precision_all(c: Counts) -> Array:
    return safe_divide(c.tp, c.tp + c.fp)


def _precision_hem(c: Counts) -> Array:
    return safe_divide(c.tn, c.tn + c.fn)


def _f1_all(c: Counts) -> Array:
    return safe_divide(2 * c.tp, 2 * c.tp + c.fp + c.fn)


def _f1_hem(c: Counts) -> Array:
    return safe_divide(2 * c.tn, 2 * c.tn + c.fn + c.fp)


def f1_macro(c: Counts) -> Array:
    """Macro F1: what the threshold rules compare (cnmc.metrics.validation_rules) as well as a metric."""
    return (_f1_all(c) + _f1_hem(c)) / 2


def _balanced_accuracy(c: Counts) -> Array:
    """Mean recall over the classes present (one class: that class's recall, as sklearn's accuracy)."""
    n_all, n_hem = c.tp + c.fn, c.tn + c.fp
    both = (_recall_all(c) + _recall_hem(c)) / 2
    return np.where(n_hem == 0, _recall_all(c), np.where(n_all == 0, _recall_hem(c), both))


def _weighted(all_class: Callable[[Counts], Array], hem_class: Callable[[Counts], Array]) -> Callable[[Counts], Array]:
    """The support-weighted mean of a per-class metric (sklearn's ``average='weighted'``)."""

    def weighted(c: Counts) -> Array:
        n_all, n_hem = c.tp + c.fn, c.tn + c.fp
        return safe_divide(n_hem * hem_class(c) + n_all * all_class(c), n_all + n_hem)

    return weighted


def weighted_roc_auc(weights: Array, y: NDArray[np.int64], p: Array) -> Array:
    """ROC AUC per row of per-cell weights (``rows x n``; a row of ones is the plain AUC):
    Mann-Whitney, ties count 1/2; NaN where a row has one class only."""
    order = np.argsort(p, kind="stable")
    ps, w = p[order], weights[:, order]
    pos, neg = w * (y[order] == 1), w * (y[order] == 0)
    cum_neg = np.cumsum(neg, axis=1)
    first, last = np.searchsorted(ps, ps, side="left"), np.searchsorted(ps, ps, side="right") - 1
    below = cum_neg[:, first] - neg[:, first]  # negative weight strictly below each cell's score
    tied = cum_neg[:, last] - below
    pairs = pos.sum(axis=1) * neg.sum(axis=1)
    wins = (pos * (below + tied / 2)).sum(axis=1)
    return np.divide(wins, pairs, out=np.full(pairs.shape, np.nan), where=pairs > 0)


# Where a metric is shown (Metric.shown_in): the comparison report's table, the model card's table,
# the report's bar chart, the headline file (dvc metrics), and the bootstrap intervals evaluation
# computes (the report's, the card's).
REPORT, CARD, BARS, HEADLINE, INTERVAL = "report", "card", "bars", "headline", "interval"
_EVERYWHERE = frozenset({REPORT, CARD, BARS, HEADLINE, INTERVAL})


@dataclass(frozen=True)
class Metric:
    """One scalar metric. ``from_counts`` computes it from confusion counts at a threshold (for
    every bootstrap resample at once); ``from_scores`` from the probabilities, per row of per-cell
    weights (ROC AUC). ``shown_in``: the views that show it."""

    name: str
    label: str
    higher_is_better: bool = True
    from_counts: Callable[[Counts], Array] | None = None
    from_scores: Callable[[Array, NDArray[np.int64], Array], Array] | None = None
    shown_in: frozenset[str] = frozenset()


REGISTRY: tuple[Metric, ...] = (
    Metric(
        "accuracy",
        "Accuracy",
        from_counts=lambda c: safe_divide(c.tp + c.tn, c.tp + c.fp + c.tn + c.fn),
        shown_in=frozenset({REPORT, CARD, BARS, INTERVAL}),
    ),
    Metric("precision_all", "Precision (ALL)", from_counts=_precision_all, shown_in=frozenset({REPORT, CARD, BARS})),
    Metric("recall_all", "Recall (ALL)", from_counts=_recall_all, shown_in=frozenset({REPORT, CARD, BARS, HEADLINE})),
    Metric("f1_all", "F1 (ALL)", from_counts=_f1_all, shown_in=_EVERYWHERE),
    Metric("roc_auc", "ROC AUC", from_scores=weighted_roc_auc, shown_in=_EVERYWHERE),
    Metric(
        "f1_macro",
        "F1 (macro)",
        from_counts=f1_macro,
        shown_in=frozenset({REPORT, CARD, HEADLINE, INTERVAL}),
    ),
    Metric(
        "balanced_accuracy",
        "Balanced accuracy",
        from_counts=_balanced_accuracy,
        shown_in=frozenset({REPORT, CARD, HEADLINE}),
    ),
    Metric("specificity", "Specificity (Hem recall)", from_counts=_recall_hem, shown_in=frozenset({CARD, HEADLINE})),
    Metric("precision_macro", "Precision (macro)", from_counts=lambda c: (_precision_all(c) + _precision_hem(c)) / 2),
    Metric("recall_macro", "Recall (macro)", from_counts=lambda c: (_recall_all(c) + _recall_hem(c)) / 2),
    Metric("precision_weighted", "Precision (weighted)", from_counts=_weighted(_precision_all, _precision_hem)),
    Metric("recall_weighted", "Recall (weighted)", from_counts=_weighted(_recall_all, _recall_hem)),
    Metric("f1_weighted", "F1 (weighted)", from_counts=_weighted(_f1_all, _f1_hem)),
)
# Every function below reads REGISTRY when called, so an entry added to it reaches every view.


def metric_names() -> tuple[str, ...]:
    """Every metric of the registry, in its order."""
    return tuple(m.name for m in REGISTRY)


def shown_in(view: str) -> tuple[str, ...]:
    """The metrics a view shows, in the registry's order."""
    return tuple(m.name for m in REGISTRY if view in m.shown_in)


# MLflow metric key prefixes of a run's evaluated model, at its reported threshold: the selected
# model on validation (per-epoch curves are ``val_*``) and on test.
MLFLOW_PREFIX = {"val": "final_val_", "test": "test_"}


def mlflow_key(split: str, metric: str) -> str:
    """The MLflow key of ``metric`` on ``split`` ('val' or 'test') at the reported threshold."""
    return f"{MLFLOW_PREFIX[split]}{metric}"


def registry_metrics(counts: Counts, weights: Array, y: NDArray[np.int64], p: Array) -> dict[str, Array]:
    """Every metric of the registry, vectorised over resamples: the confusion counts of each
    (``counts``) and its per-cell weights (``weights``, ``rows x n``) of labels ``y`` and scores ``p``."""
    out: dict[str, Array] = {}
    for metric in REGISTRY:
        if metric.from_counts is not None:
            out[metric.name] = metric.from_counts(counts)
        elif metric.from_scores is not None:
            out[metric.name] = metric.from_scores(weights, y, p)
    return out


def label(name: str) -> str:
    return next(m.label for m in REGISTRY if m.name == name)
