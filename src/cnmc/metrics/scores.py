"""Binary metrics for ALL-vs-Hem, named for exactly what they average.

Convention: ALL = 1 is the positive class, Hem = 0; ``prob_all`` is the predicted probability
of ALL and a cell is called ALL when ``prob_all >= threshold``. The paper's "macro" P/R/F1 are
really the ALL-class binary metrics (see ``docs/paper.md``), so we report ``*_all`` and
``*_macro`` apart.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray
from sklearn import metrics

from cnmc.core.metric_catalogue import INTERVAL, Counts, f1_macro, registry_metrics, shown_in
from cnmc.core.metric_catalogue import metric_names as registry_names


def checked_arrays(y_true: ArrayLike, prob_all: ArrayLike) -> tuple[NDArray[np.int64], NDArray[np.float64]]:
    """Validate once, so every metric below can trust its inputs."""
    labels = np.asarray(y_true).ravel()
    p = np.asarray(prob_all, dtype=np.float64).ravel()
    if labels.size == 0 or labels.size != p.size:
        raise ValueError(f"need equally long, non-empty labels and probabilities (got {labels.size}, {p.size})")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("labels must be 0 (Hem) or 1 (ALL)")
    y = labels.astype(np.int64)
    if not np.isfinite(p).all():
        raise ValueError("probabilities must be finite")
    return y, p


def binary_metrics(
    y_true: ArrayLike,
    prob_all: ArrayLike,
    threshold: float = 0.5,
    subjects: Sequence[str] | None = None,
) -> dict[str, float]:
    """Every metric of the registry at one threshold, with the confusion counts; with
    ``subjects``, also the mean per-subject accuracy.

    With one class present, ROC AUC is NaN and balanced accuracy is that class's recall.
    """
    y, p = checked_arrays(y_true, prob_all)
    pred = (p >= threshold).astype(np.int64)
    tn, fp, fn, tp = metrics.confusion_matrix(y, pred, labels=[0, 1]).ravel()
    counts = Counts(*(np.array([v], dtype=np.float64) for v in (tp, fp, tn, fn)))
    every = registry_metrics(counts, np.ones((1, y.size)), y, p)
    out: dict[str, float] = {name: float(values[0]) for name, values in every.items()}
    out.update(
        n=int(y.size),
        n_all=int(y.sum()),
        n_hem=int(y.size - y.sum()),
        tp=int(tp),
        fp=int(fp),
        tn=int(tn),
        fn=int(fn),
    )
    if subjects is not None:
        per_subject = per_subject_accuracy(y, p, subjects, threshold)
        out["n_subjects"] = len(per_subject)
        out["mean_subject_accuracy"] = float(np.mean([s["accuracy"] for s in per_subject.values()]))
    return out


def per_subject_accuracy(
    y_true: ArrayLike, prob_all: ArrayLike, subjects: Sequence[str], threshold: float
) -> dict[str, dict[str, Any]]:
    """Accuracy per subject (sorted by subject): shows whether errors pile up on a few people."""
    y, p = checked_arrays(y_true, prob_all)
    s = np.asarray(subjects, dtype=str).ravel()
    if s.size != y.size:
        raise ValueError(f"need one subject per cell (got {s.size} for {y.size} cells)")
    correct = (p >= threshold).astype(np.int64) == y
    out: dict[str, dict[str, Any]] = {}
    for subject in np.unique(s):
        mask = s == subject
        labels = set(y[mask].tolist())
        label = "mixed" if len(labels) == 2 else ("all" if labels == {1} else "hem")
        out[str(subject)] = {
            "n": int(mask.sum()),
            "label": label,
            "accuracy": float(correct[mask].mean()),
        }
    return out


def tune_threshold(y_true: ArrayLike, prob_all: ArrayLike) -> float:
    """The threshold that maximises macro F1; feed it VALIDATION data only, never test data.

    Candidates are 0.5 and the midpoints between consecutive distinct probabilities, so the
    result is never worse than 0.5 on these data; ties go to the candidate closest to 0.5.
    Returns 0.5 when the data hold one class (nothing to balance).
    """
    y, p = checked_arrays(y_true, prob_all)
    if np.unique(y).size < 2:
        return 0.5
    distinct = np.unique(p)
    candidates = np.append((distinct[:-1] + distinct[1:]) / 2, 0.5)
    pos, neg = np.sort(p[y == 1]), np.sort(p[y == 0])
    tp = pos.size - np.searchsorted(pos, candidates, side="left")
    fp = neg.size - np.searchsorted(neg, candidates, side="left")
    counts = (np.asarray(a, dtype=np.float64) for a in (tp, fp, neg.size - fp, pos.size - tp))
    f1 = f1_macro(Counts(*counts))
    best = np.flatnonzero(f1 >= f1.max() - 1e-12)
    return float(candidates[best[np.argmin(np.abs(candidates[best] - 0.5))]])


def judging_shortfall(y_true: ArrayLike, min_per_class: int) -> str:
    """Why a held-out set cannot choose a threshold, a temperature or an epoch ('' if it can).

    A validation set with a handful of cells of one class (real subjects differ in size by orders
    of magnitude) makes every choice fitted on it noise: a threshold tuned on 5 Hem cells gave
    specificity 0.18 on new people. Below ``min_per_class`` cells of either class, nothing is fitted.
    """
    y = np.asarray(y_true).ravel()
    n_all, n_hem = int((y == 1).sum()), int((y == 0).sum())
    if min(n_all, n_hem) >= min_per_class:
        return ""
    return (
        f"validation holds {n_all} ALL and {n_hem} Hem cells, fewer than split.min_images_per_class = "
        f"{min_per_class} of each"
    )


def bootstrap_ci(
    y_true: ArrayLike,
    prob_all: ArrayLike,
    threshold: float,
    metric_names: Sequence[str] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    groups: Sequence[str] | None = None,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap CI: how far a metric could move on another test sample.

    Over cells by default; cells of one subject are not independent, so for claims about new
    people pass ``groups`` (a subject per cell): then whole subjects are resampled (a cluster
    bootstrap), which gives the wider, honest interval. Each resample is a row of per-cell
    counts, so every metric is a matrix product; rows are processed in chunks to bound memory.
    ``metric_names``: any of the registry (default: those it shows an interval for).
    """
    metric_names = shown_in(INTERVAL) if metric_names is None else tuple(metric_names)
    unknown = set(metric_names) - set(every := registry_names())
    if unknown:
        raise ValueError(f"no bootstrap for {sorted(unknown)}; choose from {', '.join(every)}")
    y, p = checked_arrays(y_true, prob_all)
    pred = p >= threshold
    cells = confusion_cells(y, pred)
    chunks: list[dict[str, NDArray[np.float64]]] = []
    for weights in resample_weights(y.size, groups, n_boot, seed):
        chunks.append(registry_metrics(Counts(*(weights @ cells).T), weights, y, p))
    tail = (1 - level) / 2 * 100
    out: dict[str, tuple[float, float]] = {}
    for name in metric_names:
        samples = np.concatenate([chunk[name] for chunk in chunks])
        samples = samples[np.isfinite(samples)]
        low, high = np.percentile(samples, [tail, 100 - tail]) if samples.size else (np.nan, np.nan)
        out[name] = (float(low), float(high))
    return out


def confusion_cells(y: NDArray[np.int64], called_all: NDArray[np.bool_]) -> NDArray[np.float64]:
    """Each cell's one-hot (TP, FP, TN, FN) row: a resample's confusion counts are ``weights @ cells``."""
    return np.stack(
        [(y == 1) & called_all, (y == 0) & called_all, (y == 0) & ~called_all, (y == 1) & ~called_all], axis=1
    ).astype(np.float64)


def resample_weights(
    n: int, groups: Sequence[str] | None, n_boot: int, seed: int, strata: ArrayLike | None = None
) -> Iterator[NDArray[np.float64]]:
    """Bootstrap resamples as chunks of rows of per-cell counts (``rows x n``), so that a metric of
    every resample is a matrix product; chunks bound the memory.

    Each cell is its own group unless ``groups`` names one per cell (then whole groups are drawn:
    a cluster bootstrap). With ``strata`` (one label per cell, e.g. the class), groups are drawn
    within each stratum, as many as it has, so that no resample loses a class: with a handful of
    people per class an unstratified draw often has none of one.
    """
    if groups is None:
        members = np.arange(n)
    else:
        _, members = np.unique(np.asarray(groups, dtype=str).ravel(), return_inverse=True)
        if members.size != n:
            raise ValueError(f"need one group per cell (got {members.size} for {n} cells)")
    n_groups = int(members.max()) + 1 if n else 0
    if strata is None:
        pools = [np.arange(n_groups)]
    else:
        group_stratum = np.zeros(n_groups, dtype=np.int64)
        _, codes = np.unique(np.asarray(strata).ravel(), return_inverse=True)
        group_stratum[members] = codes  # a group takes the stratum of its cells (C-NMC: one class a person)
        pools = [np.flatnonzero(group_stratum == code) for code in np.unique(group_stratum)]
    rng = np.random.default_rng(seed)
    rows_per_chunk = max(1, 2_000_000 // max(n, 1))
    for start in range(0, n_boot, rows_per_chunk):
        rows = min(rows_per_chunk, n_boot - start)
        drawn = np.zeros((rows, n_groups), dtype=np.int64)
        for pool in pools:
            picks = pool[rng.integers(0, len(pool), size=(rows, len(pool)))]
            np.add.at(drawn, (np.arange(rows)[:, None], picks), 1)
        yield drawn[:, members].astype(np.float64)


def evaluate_split(
    y_true: ArrayLike,
    prob_all: ArrayLike,
    subjects: Sequence[str],
    val_threshold: float,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Everything the trainer logs for one split: metrics at 0.5 (the paper's argmax) and at the
    validation-tuned threshold, per-subject accuracy, and 95% bootstrap CIs (``n_boot=0``: none)."""
    out: dict[str, Any] = {
        "at_0.5": binary_metrics(y_true, prob_all, 0.5, subjects),
        "at_tuned": binary_metrics(y_true, prob_all, val_threshold, subjects),
        "threshold": float(val_threshold),
        "per_subject": per_subject_accuracy(y_true, prob_all, subjects, val_threshold),
    }
    if n_boot > 0:
        out["ci95"] = {
            key: {name: list(ci) for name, ci in bootstrap_ci(y_true, prob_all, t, n_boot=n_boot, seed=seed).items()}
            for key, t in (("at_0.5", 0.5), ("at_tuned", val_threshold))
        }
    return out
