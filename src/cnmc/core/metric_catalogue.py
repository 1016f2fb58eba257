"""The metrics registry: every scalar ALL-vs-Hem metric once, with its display label, its direction
and the function that computes it, and the MLflow key it is logged under.

Evaluation computes through it, the report and the model card label by it, promotion ranks by it,
and ``params.yaml`` is checked against it when it loads (so it imports only numpy).
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


def _div(num: Array, den: Array) -> Array:
    """num / den with 0 where den is 0 (sklearn's zero_division=0)."""
    return np.divide(num, den, out=np.zeros(np.broadcast(num, den).shape), where=den > 0)


def _recall_all(c: Counts) -> Array:
    return _div(c.tp, c.tp + c.fn)


def _recall_hem(c: Counts) -> Array:
    return _div(c.tn, c.tn + c.fp)


def _precision_all(c: Counts) -> Array:
    return _div(c.tp, c.tp + c.fp)


def _precision_hem(c: Counts) -> Array:
    return _div(c.tn, c.tn + c.fn)


def _f1_all(c: Counts) -> Array:
    return _div(2 * c.tp, 2 * c.tp + c.fp + c.fn)


def _f1_hem(c: Counts) -> Array:
    return _div(2 * c.tn, 2 * c.tn + c.fn + c.fp)


def _balanced_accuracy(c: Counts) -> Array:
    """Mean recall over the classes present (one class: that class's recall, as sklearn's accuracy)."""
    n_all, n_hem = c.tp + c.fn, c.tn + c.fp
    both = (_recall_all(c) + _recall_hem(c)) / 2
    return np.where(n_hem == 0, _recall_all(c), np.where(n_all == 0, _recall_hem(c), both))


def _weighted(all_class: Callable[[Counts], Array], hem_class: Callable[[Counts], Array]) -> Callable[[Counts], Array]:
    """The support-weighted mean of a per-class metric (sklearn's ``average='weighted'``)."""

    def weighted(c: Counts) -> Array:
        n_all, n_hem = c.tp + c.fn, c.tn + c.fp
        return _div(n_hem * hem_class(c) + n_all * all_class(c), n_all + n_hem)

    return weighted


@dataclass(frozen=True)
class Metric:
    """One scalar metric. ``from_counts`` computes it from confusion counts at a threshold; a metric
    of the scores themselves (ROC AUC) has none and is computed from probabilities by evaluation."""

    name: str
    label: str
    higher_is_better: bool = True
    from_counts: Callable[[Counts], Array] | None = None


REGISTRY: tuple[Metric, ...] = (
    Metric("accuracy", "Accuracy", from_counts=lambda c: _div(c.tp + c.tn, c.tp + c.fp + c.tn + c.fn)),
    Metric("balanced_accuracy", "Balanced accuracy", from_counts=_balanced_accuracy),
    Metric("precision_all", "Precision (ALL)", from_counts=_precision_all),
    Metric("recall_all", "Recall (ALL)", from_counts=_recall_all),
    Metric("specificity", "Specificity (Hem recall)", from_counts=_recall_hem),
    Metric("f1_all", "F1 (ALL)", from_counts=_f1_all),
    Metric("precision_macro", "Precision (macro)", from_counts=lambda c: (_precision_all(c) + _precision_hem(c)) / 2),
    Metric("recall_macro", "Recall (macro)", from_counts=lambda c: (_recall_all(c) + _recall_hem(c)) / 2),
    Metric("f1_macro", "F1 (macro)", from_counts=lambda c: (_f1_all(c) + _f1_hem(c)) / 2),
    Metric("precision_weighted", "Precision (weighted)", from_counts=_weighted(_precision_all, _precision_hem)),
    Metric("recall_weighted", "Recall (weighted)", from_counts=_weighted(_recall_all, _recall_hem)),
    Metric("f1_weighted", "F1 (weighted)", from_counts=_weighted(_f1_all, _f1_hem)),
    Metric("roc_auc", "ROC AUC"),
)
METRICS = {metric.name: metric for metric in REGISTRY}
SCALAR_METRICS = tuple(METRICS)
COUNT_METRICS = tuple(m.name for m in REGISTRY if m.from_counts is not None)

# MLflow metric key prefixes of a run's evaluated model, at its reported threshold: the selected
# model on validation (per-epoch curves are ``val_*``) and on test.
MLFLOW_PREFIX = {"val": "final_val_", "test": "test_"}


def mlflow_key(split: str, metric: str) -> str:
    """The MLflow key of ``metric`` on ``split`` ('val' or 'test') at the reported threshold."""
    return f"{MLFLOW_PREFIX[split]}{metric}"


def count_metrics(counts: Counts) -> dict[str, Array]:
    """Every count metric of the registry, vectorised over the confusion matrices of ``counts``."""
    return {m.name: m.from_counts(counts) for m in REGISTRY if m.from_counts is not None}


def label(name: str) -> str:
    return METRICS[name].label
