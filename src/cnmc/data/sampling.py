"""Which training rows an epoch visits, and in what order, on every rank.

Real C-NMC donors differ in size by orders of magnitude (2 to 757 cells here): a plain shuffle
spends most of an epoch on the two or three largest people, and a model learns them. The
``train.sampling`` setting chooses the epoch's draws:

- ``shuffle``: every row once, in a seeded random order (the paper's epoch);
- ``class``: as many draws as rows, with replacement, each class half of the mass;
- ``subject``: the same, and within a class every subject an equal share of its half.

With online augmentation (``augment.online``) the store holds the originals only, and an epoch is
as long as the offline store would be: M draws a class (``per_class``), each of a class's originals
visited in turn before any twice, so a small set is not trained on a handful of draws an epoch.

The draws are dealt out in turn to the torchrun ranks, so the ranks' shares are disjoint.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pandas as pd
import torch

from cnmc.core.config import AugmentConfig
from cnmc.core.distributed import World

Sampling = Literal["shuffle", "class", "subject"]


def resolve_per_class(df: pd.DataFrame, per_class: int | str, auto_min: int = 0) -> int:
    """M for a training split: ``auto`` is the largest class, so that every original is kept, and at
    least ``auto_min``, so that a small or balanced set still gets augmented images."""
    return max(int(df["label"].value_counts().max()), auto_min) if per_class == "auto" else int(per_class)


def online_per_class(cfg: AugmentConfig, train_index: pd.DataFrame) -> int | None:
    """Draws of each class in an online epoch: M, as many images as the offline store would hold
    (None where ``augment.online`` is off: the store holds them, and an epoch visits each once)."""
    return resolve_per_class(train_index, cfg.per_class, cfg.auto_min) if cfg.online else None


def draw_weights(targets: np.ndarray, subjects: np.ndarray | None, sampling: Sampling) -> np.ndarray | None:
    """Each row's probability of being drawn (sums to 1) under ``sampling``; None for ``shuffle``."""
    if sampling == "shuffle" or len(targets) == 0:
        return None
    frame = pd.DataFrame({"target": targets})
    classes = frame["target"].nunique()
    class_size = frame.groupby("target")["target"].transform("size").to_numpy(dtype=float)
    if sampling == "class" or subjects is None:
        return 1.0 / (classes * class_size)
    frame["subject"] = subjects
    subject_size = frame.groupby(["target", "subject"])["target"].transform("size").to_numpy(dtype=float)
    subjects_in_class = frame.groupby("target")["subject"].transform("nunique").to_numpy(dtype=float)
    return 1.0 / (classes * subjects_in_class * subject_size)


def epoch_rows(
    targets: np.ndarray,
    world: World,
    seed: int,
    weights: np.ndarray | None = None,
    per_class: int | None = None,
) -> np.ndarray:
    """This rank's rows of one epoch over rows of class ``targets``, dealt out in turn to the ranks:
    disjoint shares that cover the epoch and differ in size by at most one (uneven shares are joined
    by :class:`torch.distributed.algorithms.Join`).

    The epoch is a seeded permutation of every row; with ``per_class``, ``per_class`` rows of each
    class (its rows in turn, each pass freshly shuffled, then the whole epoch shuffled); with
    ``weights`` (:func:`draw_weights`), as many seeded draws with replacement as either of those.
    """
    generator = torch.Generator().manual_seed(seed)
    classes = np.unique(targets)
    length = len(targets) if per_class is None else per_class * len(classes)
    if weights is not None:
        order = torch.multinomial(torch.from_numpy(weights), length, replacement=True, generator=generator).numpy()
    elif per_class is None:
        order = torch.randperm(length, generator=generator).numpy()
    else:
        turns = [_in_turn(np.flatnonzero(targets == label), per_class, generator) for label in classes]
        epoch = np.concatenate(turns) if turns else np.zeros(0, dtype=np.int64)
        order = epoch[torch.randperm(len(epoch), generator=generator).numpy()]
    return order[world.rank :: world.size]


def _in_turn(rows: np.ndarray, count: int, generator: torch.Generator) -> np.ndarray:
    """``count`` of ``rows``: passes over all of them, each in a fresh random order, cut at ``count``."""
    passes = -(-count // len(rows))
    return np.concatenate([rows[torch.randperm(len(rows), generator=generator).numpy()] for _ in range(passes)])[:count]
