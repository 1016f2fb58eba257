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

from cnmc.inference.schema import ALL, HEM, NONE, PERSON_COLUMNS

MIN_CELLS = 5  # fewer readable cells than this: the call is made, and flagged as a guess
BOOTSTRAP = 2000


def call_person(
    probs: Sequence[float] | np.ndarray,
    threshold: float,
    unreadable: int = 0,
    seed: int = 0,
    ood: Sequence[bool] | np.ndarray | None = None,
    pixel_hashes: Sequence[str] | None = None,
) -> dict:
    """One person's row (:data:`PERSON_COLUMNS` but ``subject``) from the p(ALL) of their cells.

    A NaN p(ALL) is a cell that could not be read. Of the readable ones, a cell whose pixels repeat
    an earlier one (``pixel_hashes``) is counted once, and a cell flagged ``ood`` does not vote; the
    rest vote. With no voting cell, or more flagged cells than voting ones, the call is ``none``.
    """
    p = np.asarray(probs, dtype=np.float64)
    readable = np.isfinite(p)
    repeats = np.zeros(len(p), dtype=bool)
    if pixel_hashes is not None:
        seen: set[str] = set()
        for i, (key, ok) in enumerate(zip(pixel_hashes, readable, strict=True)):
            repeats[i] = ok and bool(key) and key in seen
            seen.add(key if ok else "")
    flagged = readable & ~repeats & (np.zeros(len(p), dtype=bool) if ood is None else np.asarray(ood, dtype=bool))
    voting = p[readable & ~repeats & ~flagged]
    row: dict = {
        "cells": len(voting),
        "unreadable": int(unreadable),
        "cells_ood": int(flagged.sum()),
        "duplicates": int(repeats.sum()),
        "threshold": float(threshold),
    }
    notes = [f"{row['duplicates']} repeated image(s) counted once"] if row["duplicates"] else []
    if row["cells_ood"]:
        notes.append(f"{row['cells_ood']} cell(s) unlike the training cells left out")
    if len(voting) == 0 or row["cells_ood"] > len(voting):
        why = (
            "no readable cell"
            if not readable.any()
            else f"{row['cells_ood']} of {row['cells_ood'] + len(voting)} distinct readable cells are unlike the "
            "cells the model was trained on"
        )
        return (
            row
            | dict.fromkeys(("mean_prob_all", "ci95_low", "ci95_high", "share_called_all"), np.nan)
            | {
                "call": NONE,
                "note": "; ".join([*notes, f"{why}: no call"]),
            }
        )
    mean = float(voting.mean())
    draws = np.random.default_rng(seed).integers(0, len(voting), size=(BOOTSTRAP, len(voting)))
    low, high = (float(v) for v in np.quantile(voting[draws].mean(axis=1), [0.025, 0.975]))
    if len(voting) < MIN_CELLS:
        notes.append(f"only {len(voting)} voting cell(s), fewer than {MIN_CELLS}: a guess, not a call")
    elif low < threshold <= high:
        notes.append(f"the interval spans the threshold {threshold:.2f}: uncertain")
    return row | {
        "mean_prob_all": mean,
        "ci95_low": low,
        "ci95_high": high,
        "share_called_all": float((voting >= threshold).mean()),
        "call": ALL if mean >= threshold else HEM,
        "note": "; ".join(notes),
    }


def call_people(
    subjects: Sequence[str],
    probs: Sequence[float] | np.ndarray,
    threshold: float,
    ood: Sequence[bool] | np.ndarray | None = None,
    pixel_hashes: Sequence[str] | None = None,
) -> pd.DataFrame:
    """One row per person (:data:`PERSON_COLUMNS`), in order of first appearance (:func:`call_person`)."""
    n = len(subjects)
    frame = pd.DataFrame(
        {
            "subject": [str(s) for s in subjects],
            "prob": np.asarray(probs, dtype=np.float64),
            "ood": np.zeros(n, dtype=bool) if ood is None else np.asarray(ood, dtype=bool),
            "hash": [""] * n if pixel_hashes is None else [str(h) for h in pixel_hashes],
        }
    )
    rows = []
    for k, (subject, cells) in enumerate(frame.groupby("subject", sort=False)):
        p = cells["prob"].to_numpy()
        called = call_person(
            p, threshold, int(np.isnan(p).sum()), seed=k, ood=cells["ood"].to_numpy(), pixel_hashes=list(cells["hash"])
        )
        rows.append({"subject": subject} | called)
    return pd.DataFrame(rows, columns=PERSON_COLUMNS)


def people_evaluation(
    subjects: Sequence[str],
    targets: Sequence[int] | np.ndarray,
    probs: Sequence[float] | np.ndarray,
    threshold: float,
    min_people_per_class: int,
    ood: Sequence[bool] | np.ndarray | None = None,
) -> dict:
    """The per-person calls on labelled cells, and across people: right out of people with an exact
    95% interval (a person called ``none`` is not right), those not called, and the ROC AUC of the
    people's mean p(ALL) where each class has at least ``min_people_per_class`` called people (None
    otherwise)."""
    table = call_people(subjects, probs, threshold, ood)
    truth = pd.DataFrame({"subject": [str(s) for s in subjects], "target": np.asarray(targets)})
    labels = truth.groupby("subject", sort=False)["target"].agg(lambda t: int(round(float(t.mean()))))
    table["label"] = table["subject"].map(labels).map({1: "all", 0: "hem"})
    table["right"] = table["call"] == table["label"]
    n, right = len(table), int(table["right"].sum())
    interval = binomtest(right, n).proportion_ci(method="exact") if n else None
    called = table[table["call"] != NONE]
    per_class = called["label"].value_counts()
    enough = all(per_class.get(label, 0) >= min_people_per_class for label in ("all", "hem"))
    auc = float(roc_auc_score(called["label"] == "all", called["mean_prob_all"])) if enough else None
    return {
        "people": n,
        "right": right,
        "accuracy": right / n if n else None,
        "accuracy_ci95": [float(interval.low), float(interval.high)] if interval else None,
        "not_called": n - len(called),
        "roc_auc": auc,
        "roc_auc_note": "" if enough else f"fewer than {min_people_per_class} people of a class: no AUC over people",
        "per_person": table.drop(columns=["threshold"]).to_dict("records"),
    }
