"""A :class:`~cnmc.training.trainer.Trainer` of the tiny backbone on a prepared store, for the tests
of the training loop and of what it is built with."""

from __future__ import annotations

from pathlib import Path

import torch

from cnmc.core.config import TrainConfig
from cnmc.data.store import ImageStore
from cnmc.data.transforms import paper_transform
from cnmc.models.backbones import create_backbone
from cnmc.training.trainer import Trainer

BACKBONE = "test_efficientnet"


def make_trainer(
    store_root: Path,
    checkpoint: Path,
    init_seed: int = 0,
    fingerprint: str = "fp",
    transform: bool = False,
    min_val_per_class: int = 1,
    **cfg: object,
) -> Trainer:
    """A Trainer for the tiny backbone; ``init_seed`` fixes the random initial weights."""
    torch.manual_seed(init_seed)
    net = create_backbone(BACKBONE, pretrained=False)
    config = TrainConfig(**{"epochs": 3, "batch_size": 16, "device": "cpu", **cfg})
    images = store_root / "images"
    train_store = ImageStore(images / "train")
    return Trainer(
        net.model,
        net.mean,
        net.std,
        train_store,
        ImageStore(images / "val"),
        config,
        seed=7,
        checkpoint_path=checkpoint,
        fingerprint=fingerprint,
        min_val_per_class=min_val_per_class,
        train_transform=paper_transform(train_store.image_size) if transform else None,
        progress=False,
    )
