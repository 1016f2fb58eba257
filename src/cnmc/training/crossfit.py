"""Cross-fitting over people: the folds' stores and the choices made on pooled out-of-fold answers.

Under ``split.validation: crossfit`` the split gives every training person a fold (column ``fold``
of the train and val stores, which list the same people). Fold k's model trains on the other folds'
people and judges fold k's, so every person teaches K-1 models and judges one; every choice that a
holdout split would make on its few validation people (the epoch here; threshold, temperature and
TTA in :mod:`cnmc.jobs.evaluate`) is made on the pooled out-of-fold answers of all of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.metrics import log_loss

from cnmc.data.split import FOLD_COLUMN, cross_fitted
from cnmc.data.store import ImageStore
from cnmc.metrics.scores import binary_metrics


def fold_count(store: ImageStore) -> int:
    """K of a cross-fitted store (0 for a holdout store)."""
    return int(store.index[FOLD_COLUMN].astype(int).max()) + 1 if cross_fitted(store.index) else 0


def fold_rows(store: ImageStore, fold: int, inside: bool = True) -> np.ndarray:
    """Rows of ``store`` whose person is in ``fold`` (``inside``), or in any other fold."""
    folds = store.index[FOLD_COLUMN].astype(int).to_numpy()
    return np.flatnonzero(folds == fold if inside else folds != fold)


def fold_stores(train: ImageStore, val: ImageStore, fold: int) -> tuple[ImageStore, ImageStore]:
    """Fold ``fold``'s training view (the other folds' people, with their augmented copies) and its
    judging view (its own people, as stored for validation: no augmentation)."""
    return train.subset(fold_rows(train, fold, inside=False)), val.subset(fold_rows(val, fold))


def fold_people(store: ImageStore) -> list[dict[str, int]]:
    """People of each class in each fold of a cross-fitted store (none for a holdout store)."""
    if not cross_fitted(store.index):
        return []
    index = store.index
    return [
        {
            label: int(
                index.loc[(index[FOLD_COLUMN].astype(int) == k) & (index["label"] == label), "subject"].nunique()
            )
            for label in ("all", "hem")
        }
        for k in range(fold_count(store))
    ]


@dataclass(frozen=True)
class EpochChoice:
    """The epoch all folds' models are taken at, and the pooled out-of-fold scores of every epoch."""

    epoch: int  # 1-based
    pooled: list[dict[str, float]]  # per epoch: epoch, val_f1_macro, val_roc_auc, val_loss (pooled)
    selection: str


def choose_epoch(targets: np.ndarray, fold_of_row: np.ndarray, probs: list[list[np.ndarray]]) -> EpochChoice:
    """The epoch whose pooled out-of-fold answers rank people's cells best: highest ROC AUC, ties
    broken by the lower log loss.

    Threshold-free on purpose: macro F1 at 0.5 rewards the epoch whose fold models happen to sit
    near 0.5 on their few judging people, and kept the first epoch on a stand-in of six unseen people
    (test AUC 0.46) where one fold model alone reached validation AUC 0.94 at epoch 4. The threshold
    and the temperature are chosen afterwards, on the same pooled answers, by their own rules.

    ``targets`` and ``fold_of_row``: the val store's, in its row order; ``probs[k][e]``: fold k's
    model's P(ALL) of its own rows (in row order) after epoch e + 1.
    """
    epochs = min(len(per_fold) for per_fold in probs)
    pooled: list[dict[str, float]] = []
    for epoch in range(epochs):
        p = np.empty(len(targets), dtype=np.float64)
        for fold, per_epoch in enumerate(probs):
            p[fold_of_row == fold] = per_epoch[epoch]
        m = binary_metrics(targets, p)
        loss = float(log_loss(targets, p, labels=[0, 1]))
        pooled.append(
            {"epoch": epoch + 1, "val_f1_macro": m["f1_macro"], "val_roc_auc": m["roc_auc"], "val_loss": loss}
        )
    best = max(pooled, key=lambda row: (np.nan_to_num(row["val_roc_auc"], nan=-1.0), -row["val_loss"]))
    selection = (
        f"best pooled out-of-fold ROC AUC over {len(probs)} folds (epoch {int(best['epoch'])} of {epochs}: "
        f"ROC AUC {best['val_roc_auc']:.4f}, macro F1 at 0.5 {best['val_f1_macro']:.4f})"
    )
    return EpochChoice(int(best["epoch"]), pooled, selection)
