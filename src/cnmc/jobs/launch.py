"""What ``cnmc train`` runs around the fit (:mod:`cnmc.jobs.train`): torchrun's process group, and
the choice or preparation of the store to train on (:mod:`cnmc.jobs.prepare`).

Kept apart from the fit so that the DVC ``train`` stage, whose store is the augment stage's, does
not depend on the preparation code and its settings.
"""

from __future__ import annotations

from pathlib import Path

from cnmc.core.config import Params
from cnmc.core.distributed import process_group
from cnmc.jobs.paths import RunPaths
from cnmc.jobs.prepare import store_root
from cnmc.jobs.train import train_backbone
from cnmc.metrics.document import FitSummary
from cnmc.training.trainer import uses_cuda


def train(
    params: Params,
    backbone: str,
    run_root: Path,
    data: Path | None = None,
    test_data: Path | None = None,
    resume: bool = False,
    weights_path: str | None = None,
    progress: bool = True,
) -> tuple[FitSummary | None, RunPaths]:
    """``cnmc train``: find or prepare the store (:func:`cnmc.jobs.prepare.store_root`), then
    :func:`train_backbone`. Under torchrun every rank calls this: rank 0 prepares the data first and
    the others then reuse it; only rank 0 gets the summary (the others None)."""
    with process_group(uses_cuda(params.train)) as world:
        if not world.is_main:
            world.barrier()
        store = store_root(params, data, run_root if data else None, test_data, progress=progress)
        if world.is_main:
            world.barrier()
        paths = RunPaths(run_root, backbone, store)
        fit = train_backbone(
            params, backbone, paths, resume=resume, weights_path=weights_path, progress=progress, world=world
        )
    return fit, paths
