"""A call per person: the cells of one person vote, and the call says how sure it can be.

A haematologist diagnoses a person, not a cell, and in C-NMC every subject is all-ALL or all-normal.
A person's call is ALL when the mean p(ALL) of their readable cells reaches the model's decision
threshold. Its uncertainty is a bootstrap interval of that mean over the person's cells (cells of
one person are not independent draws of the disease, so the interval is optimistic about the
person, never pessimistic). Too few cells, or an interval that spans the threshold, is said in a
note beside the call rather than hidden.

Evaluation (:func:`people_evaluation`) counts the people called right, with an exact
(Clopper-Pearson) interval, and an AUC over people where there are enough of both classes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy.stats import binomtest
from sklearn.metrics import roc_auc_score

from cnmc.inference.schema import ALL, HEM, PERSON_COLUMNS

MIN_CELLS = 5  # fewer readable cells than this: the call is made, and flagged as a guess
BOOTSTRAP = 2000


def call_person(probs: Sequence[float] | np.ndarray, threshold: float, unreadable: int = 0, seed: int = 0) -> dict:
    """One person's row (:data:`PERSON_COLUMNS` but ``subject``) from the p(ALL) of their readable cells."""
    p = np.asarray(probs, dtype=np.float64)
    p = p[np.isfinite(p)]
    row: dict = {"cells": len(p), "unreadable": int(unreadable), "threshold": float(threshold)}
    if len(p) == 0:
        return row | {
            "mean_prob_all": np.nan,
            "ci95_low": np.nan,
            "ci95_high": np.nan,
            "share_called_all": np.nan,
            "call": "",
            "note": "no readable cell: no call",
        }
    mean = float(p.mean())
    draws = np.random.default_rng(seed).integers(0, len(p), size=(BOOTSTRAP, len(p)))
    low, high = (float(v) for v in np.quantile(p[draws].mean(axis=1), [0.025, 0.975]))
    notes = []
    if len(p) < MIN_CELLS:
        notes.append(f"only {len(p)} readable cell(s), fewer than {MIN_CELLS}: a guess, not a call")
    elif low < threshold <= high:
        notes.append(f"the interval spans the threshold {threshold:.2f}: uncertain")
    return row | {
        "mean_prob_all": mean,
        "ci95_low": low,
        "ci95_high": high,
        "share_called_all": float((p >= threshold).mean()),
        "call": ALL if mean >= threshold else HEM,
        "note": "; ".join(notes),
    }


def call_people(subjects: Sequence[str], probs: Sequence[float] | np.ndarray, threshold: float) -> pd.DataFrame:
    """One row per person (:data:`PERSON_COLUMNS`), in order of first appearance; a NaN p(ALL) is
    an unreadable cell, counted but not voting."""
    frame = pd.DataFrame({"subject": [str(s) for s in subjects], "prob": np.asarray(probs, dtype=np.float64)})
    rows = []
    for k, (subject, cells) in enumerate(frame.groupby("subject", sort=False)):
        p = cells["prob"].to_numpy()
        rows.append({"subject": subject} | call_person(p, threshold, int(np.isnan(p).sum()), seed=k))
    return pd.DataFrame(rows, columns=PERSON_COLUMNS)


def people_evaluation(
    subjects: Sequence[str],
    targets: Sequence[int] | np.ndarray,
    probs: Sequence[float] | np.ndarray,
    threshold: float,
    min_people_per_class: int,
) -> dict:
    """The per-person calls on labelled cells, and across people: right out of people with an exact
    95% interval, and the ROC AUC of the people's mean p(ALL) where each class has at least
    ``min_people_per_class`` people (None otherwise)."""
    table = call_people(subjects, probs, threshold)
    truth = pd.DataFrame({"subject": [str(s) for s in subjects], "target": np.asarray(targets)})
    labels = truth.groupby("subject", sort=False)["target"].agg(lambda t: int(round(float(t.mean()))))
    table["label"] = table["subject"].map(labels).map({1: "all", 0: "hem"})
    table["right"] = table["call"] == table["label"]
    n, right = len(table), int(table["right"].sum())
    interval = binomtest(right, n).proportion_ci(method="exact") if n else None
    per_class = table["label"].value_counts()
    enough = all(per_class.get(label, 0) >= min_people_per_class for label in ("all", "hem"))
    auc = float(roc_auc_score(table["label"] == "all", table["mean_prob_all"])) if enough else None
    return {
        "people": n,
        "right": right,
        "accuracy": right / n if n else None,
        "accuracy_ci95": [float(interval.low), float(interval.high)] if interval else None,
        "roc_auc": auc,
        "roc_auc_note": "" if enough else f"fewer than {min_people_per_class} people of a class: no AUC over people",
        "per_person": table.drop(columns=["threshold"]).to_dict("records"),
    }
