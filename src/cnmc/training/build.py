"""A trainer wired once: the seed, the backbone and its weights, the online augmentation, the
class draws and the :class:`~cnmc.training.trainer.Trainer`. The train job, each tuning trial and
the benchmarks build theirs here, so a new setting reaches all of them."""

from __future__ import annotations

from pathlib import Path

import torch

from cnmc.core.config import Params
from cnmc.core.distributed import ONE_PROCESS, World
from cnmc.data.batch_augment import PaperBatchTransform
from cnmc.data.sampling import online_per_class
from cnmc.data.store import ImageStore
from cnmc.models.backbones import Backbone, create_backbone, weights_in_dir
from cnmc.training.trainer import Trainer


def build_trainer(
    params: Params,
    backbone: str,
    train: ImageStore,
    val: ImageStore,
    checkpoint: Path,
    fingerprint: str,
    *,
    weights_path: str | None = None,
    strength: float | None = None,
    progress: bool = True,
    world: World = ONE_PROCESS,
) -> tuple[Trainer, Backbone]:
    """The trainer of ``backbone`` under ``params`` on ``train``/``val``, and the built network.

    The seed is set before the network is built: a random init (or the new head of a pretrained
    one) draws its starting weights here, so the same seed, settings and data give the same run.
    ``weights_path``: a local weights file (default: ``train.weights_dir``'s). ``strength``: draw the
    paper's T at this strength for every training image (a tuning trial); None: as ``augment.online``
    says, at ``augment.strength``.
    """
    torch.manual_seed(params.seed)
    net = create_backbone(
        backbone,
        pretrained=params.train.pretrained,
        weights_path=weights_path or weights_in_dir(params.train.weights_dir, backbone),
    )
    trainer = Trainer(
        net.model,
        net.mean,
        net.std,
        train,
        val,
        params.train,
        params.seed,
        checkpoint,
        fingerprint,
        params.split.min_images_per_class,
        train_transform=online_transform(params, train.image_size, strength),
        per_class=online_per_class(params.augment, train.index),
        progress=progress,
        world=world,
    )
    return trainer, net


def online_transform(params: Params, image_size: int, strength: float | None = None) -> PaperBatchTransform | None:
    """The paper's T, drawn afresh for every training image of every epoch (batch by batch), at
    ``strength`` where given, else at ``augment.strength`` where ``augment.online`` stores originals
    only (None: the store holds the augmented images)."""
    if strength is None and params.augment.online:
        strength = params.augment.strength
    return None if strength is None else PaperBatchTransform(image_size, strength)
