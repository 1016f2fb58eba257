"""The training curves of one fit (the train stage's plot): loss and validation scores per epoch."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from cnmc.core.atomic import atomic_write_png


def training_curves_png(history: Sequence[Mapping[str, float]], path: Path | str) -> Path:
    """Losses (left) and validation macro F1 / AUC (right), best epoch by macro F1 marked.

    Each entry: ``epoch, train_loss, val_loss, val_f1_macro, val_roc_auc``. The best epoch is
    the one early stopping keeps (highest validation macro F1, earliest on ties).
    """
    table = pd.DataFrame(list(history))
    best = table.loc[table["val_f1_macro"].idxmax()]
    fig = Figure(figsize=(10, 4))
    loss_ax, score_ax = fig.subplots(1, 2)
    loss_ax.plot(table["epoch"], table["train_loss"], "o-", ms=3, label="train loss")
    loss_ax.plot(table["epoch"], table["val_loss"], "o-", ms=3, label="validation loss")
    loss_ax.set(xlabel="Epoch", ylabel="Cross-entropy loss", title="Loss")
    score_ax.plot(table["epoch"], table["val_f1_macro"], "o-", ms=3, label="validation F1 (macro)")
    score_ax.plot(table["epoch"], table["val_roc_auc"], "o-", ms=3, label="validation ROC AUC")
    score_ax.set(xlabel="Epoch", ylabel="Score", title="Validation scores", ylim=(0, 1.02))
    for ax in (loss_ax, score_ax):
        ax.axvline(best["epoch"], color="grey", ls="--", lw=1, label=f"best epoch {int(best['epoch'])}")
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs, also for a run of one
        ax.legend(fontsize=8)
    score_ax.plot(best["epoch"], best["val_f1_macro"], "*", ms=12, color="C3", zorder=3)
    score_ax.annotate(
        f"best F1 {best['val_f1_macro']:.4f}",
        (best["epoch"], best["val_f1_macro"]),
        textcoords="offset points",
        xytext=(0, -18),
        ha="center",
        fontsize=9,
        bbox={"boxstyle": "round", "fc": "white", "ec": "grey", "alpha": 0.9},
    )
    return atomic_write_png(fig, path)
