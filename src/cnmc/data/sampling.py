"""Which training rows an epoch visits, and in what order, on every rank.

Real C-NMC donors differ in size by orders of magnitude (2 to 757 cells here): a plain shuffle
spends most of an epoch on the two or three largest people, and a model learns them. The
``train.sampling`` setting chooses the epoch's draws:

- ``shuffle``: every row once, in a seeded random order (the paper's epoch);
- ``class``: as many draws as rows, with replacement, each class half of the mass;
- ``subject``: the same, and within a class every subject an equal share of its half.

The draws are dealt out in turn to the torchrun ranks, so the ranks' shares are disjoint.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pandas as pd
import torch

from cnmc.distributed import World

Sampling = Literal["shuffle", "class", "subject"]


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


def epoch_rows(n: int, world: World, seed: int, weights: np.ndarray | None = None) -> np.ndarray:
    """This rank's rows of one epoch of ``n`` rows: a seeded permutation of all of them, or with
    ``weights`` (:func:`draw_weights`) ``n`` seeded draws with replacement, dealt out in turn to the
    ranks: disjoint shares that cover the epoch and differ in size by at most one (uneven shares are
    joined by :class:`torch.distributed.algorithms.Join`)."""
    generator = torch.Generator().manual_seed(seed)
    if weights is None:
        order = torch.randperm(n, generator=generator)
    else:
        order = torch.multinomial(torch.from_numpy(weights), n, replacement=True, generator=generator)
    return order.numpy()[world.rank :: world.size]
