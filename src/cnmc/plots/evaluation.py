"""Evaluation plots as PNG files (for MLflow and DVC), plus the data files ``dvc plots`` renders.

Uses ``matplotlib.figure.Figure`` directly (Agg canvas, no pyplot state), so it is safe in
headless runs and never changes the process-wide backend. Every writer returns the path written.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from numpy.typing import ArrayLike
from sklearn import metrics

from cnmc.core.atomic import atomic_write_png, atomic_write_text
from cnmc.core.metric_catalogue import BARS, label, shown_in
from cnmc.metrics.calibration import expected_calibration_error, reliability_bins

CLASS_NAMES = ("hem", "all")  # index = label: Hem = 0, ALL = 1


def _confusion(y_true: ArrayLike, y_pred: ArrayLike) -> np.ndarray:
    """2x2 counts, rows = actual (hem, all), columns = predicted (hem, all)."""
    return metrics.confusion_matrix(np.asarray(y_true), np.asarray(y_pred), labels=[0, 1])


def confusion_matrix_png(y_true: ArrayLike, y_pred: ArrayLike, path: Path | str, title: str) -> Path:
    """Counts and row percentages (recall per actual class) in each cell."""
    matrix = _confusion(y_true, y_pred)
    row_share = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    fig = Figure(figsize=(4.2, 3.8))
    ax = fig.subplots()
    ax.imshow(row_share, cmap="Blues", vmin=0, vmax=1)
    for (i, j), count in np.ndenumerate(matrix):
        color = "white" if row_share[i, j] > 0.6 else "black"
        text = f"{count}\n{row_share[i, j]:.1%}"
        ax.text(j, i, text, ha="center", va="center", color=color, fontsize=12)
    labels = [name.upper() if name == "all" else name.capitalize() for name in CLASS_NAMES]
    ax.set_xticks([0, 1], labels)
    ax.set_yticks([0, 1], labels)
    ax.set_xlabel("Predicted")
    ax.set_ylabel("Actual")
    ax.set_title(title)
    return atomic_write_png(fig, path)


def confusion_matrix_json(y_true: ArrayLike, y_pred: ArrayLike, path: Path | str) -> Path:
    """The matrix plus one ``{"actual", "predicted"}`` row per cell.

    The rows are what DVC's built-in ``confusion`` template counts (it finds the list of
    objects inside the file): ``plots: - <path>: {template: confusion, x: actual, y: predicted}``.
    """
    actual, predicted = np.asarray(y_true).astype(int), np.asarray(y_pred).astype(int)
    payload = {
        "labels": list(CLASS_NAMES),
        "matrix": _confusion(actual, predicted).tolist(),
        "rows": [
            {"actual": CLASS_NAMES[a], "predicted": CLASS_NAMES[p]} for a, p in zip(actual, predicted, strict=True)
        ],
    }
    path = Path(path)
    atomic_write_text(path, json.dumps(payload, indent=1) + "\n")
    return path


def roc_csv(y_true: ArrayLike, prob_all: ArrayLike, path: Path | str) -> Path:
    """ROC points (columns fpr, tpr, threshold) for a DVC plot with ``x: fpr, y: tpr``.

    The first row's threshold is ``inf`` (sklearn's "above every score" point at (0, 0)).
    """
    fpr, tpr, thresholds = metrics.roc_curve(np.asarray(y_true), np.asarray(prob_all))
    path = Path(path)
    table = pd.DataFrame({"fpr": fpr, "tpr": tpr, "threshold": thresholds})
    atomic_write_text(path, table.to_csv(index=False, float_format="%.6g"))
    return path


def roc_png(y_true: ArrayLike, prob_all: ArrayLike, path: Path | str, title: str) -> Path:
    """ROC curve with its AUC and the operating point of threshold 0.5 marked."""
    y, p = np.asarray(y_true), np.asarray(prob_all)
    fig = Figure(figsize=(4.5, 4.5))
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="chance")
    if np.unique(y).size == 2:
        fpr, tpr, _ = metrics.roc_curve(y, p)
        ax.plot(fpr, tpr, lw=2, label=f"AUC = {metrics.roc_auc_score(y, p):.4f}")
        pred = p >= 0.5
        point = (pred[y == 0].mean(), pred[y == 1].mean())
        ax.plot(*point, "o", color="C3", label=f"threshold 0.5 (FPR {point[0]:.3f}, TPR {point[1]:.3f})")
    else:
        ax.text(0.5, 0.5, "ROC undefined:\nonly one class present", ha="center", va="center")
    ax.set(
        xlim=(0, 1),
        ylim=(0, 1.01),
        xlabel="False positive rate (Hem called ALL)",
        ylabel="True positive rate (ALL recall)",
        title=title,
    )
    ax.legend(loc="lower right", fontsize=8)
    return atomic_write_png(fig, path)


def reliability_png(
    y_true: ArrayLike,
    prob_before: ArrayLike,
    prob_after: ArrayLike,
    path: Path | str,
    title: str,
    n_bins: int = 15,
) -> Path:
    """Reliability diagram: accuracy vs confidence of the predicted class, per confidence bin,
    before and after calibration, each with its ECE in the legend; below, cells per bin."""
    fig = Figure(figsize=(5, 6))
    ax, hist = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfect calibration")
    width = 1 / n_bins
    for k, (name, prob) in enumerate((("before", prob_before), ("after", prob_after))):
        bins = reliability_bins(y_true, prob, n_bins)
        used = bins.count > 0
        ece = expected_calibration_error(y_true, prob, n_bins)
        ax.plot(bins.confidence[used], bins.accuracy[used], "o-", ms=4, color=f"C{k}", label=f"{name}: ECE {ece:.4f}")
        centres = bins.edges[:-1] + width / 2
        hist.bar(centres + (k - 0.5) * width / 2, bins.count, width / 2, color=f"C{k}", label=name)
    # Two classes: the predicted class's confidence is never below 0.5.
    ax.set(xlim=(0.45, 1.0), ylim=(0, 1.01), ylabel="Accuracy of the predicted class", title=title)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    hist.set(xlabel="Confidence of the predicted class", ylabel="Cells")
    hist.legend(fontsize=7)
    return atomic_write_png(fig, path)


def metric_bars_png(table: pd.DataFrame, path: Path | str, title: str) -> Path:
    """One panel per model: bars of accuracy, ALL-class P/R/F1 and AUC (in %) for each result.

    ``table`` needs columns ``backbone``, ``result`` (the legend label, e.g. "paper") and the
    metrics the registry shows in bars (``shown_in(BARS)``) in percent; an optional ``protocol``
    column splits panels by protocol.
    A result's colour is its position within its model's rows, so colours mean the same in
    every panel; rows without any value (a model the paper did not test) are left out.
    """
    names = list(shown_in(BARS))
    keys = ["protocol", "backbone"] if "protocol" in table else ["backbone"]
    table = table.assign(slot=table.groupby(keys, sort=False).cumcount())
    table = table.dropna(subset=names, how="all")
    panels = list(table.groupby(keys, sort=False))
    values = table[names].to_numpy(dtype=float)
    low = max(0.0, np.floor(np.nanmin(values) / 10) * 10 - 10) if np.isfinite(values).any() else 0.0
    fig = Figure(figsize=(max(6.0, 4.2 * len(panels)), 5.2))
    axes = fig.subplots(1, max(1, len(panels)), sharey=True, squeeze=False)[0]
    x = np.arange(len(names))
    for ax, (key, rows) in zip(axes, panels, strict=False):
        width = 0.8 / len(rows)
        for k, (_, row) in enumerate(rows.iterrows()):
            heights = row[names].to_numpy(dtype=float)
            offset = (k - (len(rows) - 1) / 2) * width
            bars = ax.bar(
                x + offset, np.nan_to_num(heights, nan=low), width, label=row["result"], color=f"C{row['slot']}"
            )
            labels = [f"{v:.2f}" if np.isfinite(v) else "—" for v in heights]
            ax.bar_label(bars, labels=labels, rotation=90, padding=2, fontsize=7)
        ax.set_xticks(x, [label(name) for name in names], rotation=30, ha="right")
        ax.set_title(" / ".join(map(str, key)), fontsize=10)
        ax.set_ylim(low, 106)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.22), frameon=False)
    axes[0].set_ylabel(f"% (axis starts at {low:.0f})")
    fig.suptitle(title)
    return atomic_write_png(fig, path)
