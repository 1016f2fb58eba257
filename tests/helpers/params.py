"""Tiny settings: the seed, the tiny synthetic data set and store, and fast CPU training."""

from __future__ import annotations

SEED = 42

# 3 training subjects per class (one per fold), 1 preliminary-test subject per class.
TINY_SYNTHETIC = {
    "train_subjects_per_class": 3,
    "prelim_subjects_per_class": 1,
    "all_cells_per_subject": 4,
    "hem_cells_per_subject": 3,
    "final_images": 1,
    "image_size": 96,
}
# The offline store (M images a class stored): what most data tests look at; online is tested apart.
TINY_AUGMENT = {"image_size": 32, "per_class": 16, "workers": 1, "online": False}


def tiny_params(min_images_per_class: int = 1, **train: object):
    """Defaults with the tiny store's augment settings and a fast, random-init CPU training (1 epoch).

    The tiny validation split (a few cells a class) may fit threshold and temperature unless
    ``min_images_per_class`` says otherwise, so that those paths are tested.
    """
    from cnmc.core.config import Params

    params = Params()
    train_cfg = {"epochs": 1, "batch_size": 16, "device": "cpu", "pretrained": False, **train}
    return params.model_copy(
        update={
            "split": params.split.model_copy(
                update={"min_images_per_class": min_images_per_class, "validation": "holdout"}
            ),
            "train": params.train.model_copy(update=train_cfg),
            "augment": params.augment.model_copy(update=TINY_AUGMENT),
        }
    )
