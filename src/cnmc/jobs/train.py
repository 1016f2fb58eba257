"""The ``train@<backbone>`` stage: fine-tune one backbone and log the fit to a new MLflow run.

It writes the weights, the uncalibrated ``model.json`` and ``fit.json`` (the run id and what the
fit found) to ``outputs/models/<backbone>``, and the training curves. On a cross-fitted store
(``split.validation: crossfit``) it trains one model per fold, each a child run of the backbone's
run, and keeps every fold's model at the epoch whose pooled out-of-fold answers score best
(:mod:`cnmc.training.crossfit`): the K models are the served ensemble. Everything that judges the
model (temperature, threshold, test metrics, the logged pyfunc) is the evaluate stage's
(:mod:`cnmc.jobs.evaluate`), so that changing how a model is judged or served retrains nothing.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch

from cnmc.core.atomic import atomic_write_text
from cnmc.core.config import Params
from cnmc.core.distributed import ONE_PROCESS, World
from cnmc.core.errors import CnmcError
from cnmc.data.split import FOLD_COLUMN
from cnmc.data.store import ImageStore
from cnmc.inference.spec import ModelSpec
from cnmc.jobs.paths import RunPaths, mkdir, open_stores
from cnmc.metrics.document import FitSummary
from cnmc.models.backbones import Backbone
from cnmc.plots.training import training_curves_png
from cnmc.tracking.runs import flat_params, killed_on_interrupt, store_hash, training_run
from cnmc.training.build import build_trainer
from cnmc.training.crossfit import choose_epoch, fold_count, fold_people, fold_stores
from cnmc.training.trainer import FitResult, Trainer, config_fingerprint


def train_backbone(
    params: Params,
    backbone: str,
    paths: RunPaths,
    resume: bool = False,
    weights_path: str | None = None,
    progress: bool = True,
    world: World = ONE_PROCESS,
) -> FitSummary | None:
    """Train ``backbone`` on the store, log params and per-epoch metrics, save the selected weights.

    Under torchrun every rank trains (:class:`cnmc.training.trainer.Trainer`); rank 0 alone logs the one MLflow
    run (with ``world_size``) and writes the outputs, and the other ranks return None.
    """
    stores = open_stores(paths.store)
    fingerprint = config_fingerprint({"params": flat_params(params, backbone), "store": store_hash(paths.store)})
    job = FitJob(params, backbone, paths, stores, fingerprint, resume, weights_path, progress, world)
    folds = fold_count(stores["val"])
    fit_one = _fit_folds if folds else _fit_holdout
    if not world.is_main:
        try:
            fit_one(job, None)
        except KeyboardInterrupt:
            raise CnmcError("interrupted: rank 0 keeps the last epoch's checkpoint") from None
        return None
    run_id_file = paths.checkpoint.with_name("mlflow_run_id")
    resume_run = run_id_file.read_text().strip() if resume and run_id_file.is_file() else None
    extra = {"world_size": world.size, "folds": folds}
    with training_run(params, backbone, resume_run, extra_params=extra) as run:
        mkdir(paths.checkpoint.parent)
        run_id_file.write_text(run.info.run_id)
        interrupted = (
            f"interrupted: the last epoch's checkpoint is in {paths.checkpoint.parent}; rerun with --resume to continue"
        )
        with killed_on_interrupt(interrupted):
            fit, net = fit_one(job, run.info.run_id)
        if not resume_run:
            mlflow.log_param("weights", net.weights)
        curves = training_curves_png(fit.history, mkdir(paths.curves.parent) / paths.curves.name)
        atomic_write_text(paths.history, pd.DataFrame(fit.history).to_csv(index=False, float_format="%.6g"))
        mlflow.log_artifact(str(curves), artifact_path="plots")
        framing = stores["train"].framing
        ModelSpec(
            backbone,
            framing.image_size,
            net.mean,
            net.std,
            colour=params.train.colour,
            crop=framing.crop,
            crop_margin=framing.margin,
        ).save(mkdir(paths.model_dir) / "model.json")
        summary = FitSummary(
            backbone=backbone,
            run_id=run.info.run_id,
            weights=net.weights,
            best_epoch=fit.best_epoch,
            epochs_run=len(fit.history),
            epoch_selection=fit.selection,
            stopped_early=fit.stopped_early,
            train_seconds=round(fit.seconds, 1),
            best_val_f1_macro=fit.best_val_f1_macro,
            store=str(paths.store),
            folds=folds,
            fold_people=fold_people(stores["val"]),
        )
        summary.save(paths.fit_file)
    return summary


@dataclass(frozen=True)
class FitJob:
    """What one fit of a backbone works with: the settings, where it reads and writes, the stores,
    the fingerprint a resumed checkpoint must match, and the torchrun world."""

    params: Params
    backbone: str
    paths: RunPaths
    stores: dict[str, ImageStore]
    fingerprint: str
    resume: bool
    weights_path: str | None
    progress: bool
    world: World

    def trainer(
        self, params: Params, train: ImageStore, val: ImageStore, checkpoint: Path, fingerprint: str
    ) -> tuple[Trainer, Backbone]:
        """The trainer and network of this backbone on ``train``/``val`` (:func:`build_trainer`)."""
        return build_trainer(
            params,
            self.backbone,
            train,
            val,
            checkpoint,
            fingerprint,
            weights_path=self.weights_path,
            progress=self.progress,
            world=self.world,
        )


@dataclass(frozen=True)
class Network:
    """What the model.json and fit.json say of the network trained: its weights' source and input
    normalisation (kept with each finished fold, so a resume that retrains nothing still knows)."""

    weights: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def _fit_holdout(job: FitJob, run_id: str | None) -> tuple[FitResult, Network]:
    """One model on the train store, early-stopped on the val store's people; rank 0 logs each
    epoch to run ``run_id`` and saves ``weights.pt``."""
    stores, paths = job.stores, job.paths
    trainer, net = job.trainer(job.params, stores["train"], stores["val"], paths.checkpoint, job.fingerprint)
    fit = trainer.fit(resume=job.resume, on_epoch=_epoch_logger(run_id) if run_id else None)
    if run_id:
        torch.save(trainer.model.state_dict(), mkdir(paths.model_dir) / "weights.pt")
    return fit, Network(net.weights, net.mean, net.std)


def _fit_folds(job: FitJob, run_id: str | None) -> tuple[FitResult, Network]:
    """K models, fold k's trained on the other folds' people for every epoch (no early stopping:
    the epoch is chosen afterwards on all folds' pooled answers), each a child run of ``run_id``.
    A finished fold is kept on disk (``fold.json`` and its per-epoch weights), so ``--resume``
    after an interruption starts in the fold it stopped in, from that fold's last checkpoint."""
    params: Params = job.params
    stores, paths, world = job.stores, job.paths, job.world
    # A fold's own people choose nothing (no early stopping, no "too small to judge" fallback): the pooled answers do.
    every_epoch = params.model_copy(
        update={
            "train": params.train.model_copy(update={"patience": params.train.epochs}),
            "split": params.split.model_copy(update={"min_images_per_class": 1}),
        }
    )
    val, folds = stores["val"], fold_count(stores["val"])
    if not job.resume and world.is_main:  # a fresh fit: no fold of an earlier one counts as done
        for stale in paths.checkpoint.parent.glob("fold_*"):
            shutil.rmtree(stale, ignore_errors=True)
    world.barrier()
    probs: list[list[np.ndarray]] = []
    histories, seconds = [], 0.0
    for fold in range(folds):
        work = paths.fold_work(fold)
        done = _finished_fold(work / "fold.json", job.fingerprint)
        if done is None:
            train_k, val_k = fold_stores(stores["train"], val, fold)
            trainer, net = job.trainer(
                every_epoch, train_k, val_k, work / "checkpoint.pt", f"{job.fingerprint}-fold{fold}"
            )
            if run_id:
                with _fold_run(work, run_id, job.backbone, fold, job.resume) as child:
                    keep = _epoch_keeper(trainer.model, work, _epoch_logger(child))
                    fit = trainer.fit(resume=job.resume, on_epoch=keep)
            else:
                fit = trainer.fit(resume=job.resume)
            done = {"fingerprint": job.fingerprint, "history": fit.history, "val_probs": fit.val_probs}
            done |= {"seconds": fit.seconds, "network": asdict(Network(net.weights, net.mean, net.std))}
            if world.is_main:
                atomic_write_text(work / "fold.json", json.dumps(done))
        probs.append([np.asarray(p) for p in done["val_probs"]])
        histories.append(done["history"])
        seconds += float(done["seconds"])
        network = done["network"]
    fold_of_row = val.index[FOLD_COLUMN].astype(int).to_numpy()
    choice = choose_epoch(val.targets, fold_of_row, probs)
    history = [
        row | {"train_loss": float(np.mean([h[i]["train_loss"] for h in histories]))}
        for i, row in enumerate(choice.pooled)
    ]
    if run_id:
        for row in history:
            mlflow.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=int(row["epoch"]))
        for fold in range(folds):
            chosen = paths.fold_work(fold) / f"epoch_{choice.epoch}.pt"
            shutil.copyfile(chosen, mkdir(paths.model_dir) / paths.fold_weights(fold).name)
            for other in paths.fold_work(fold).glob("epoch_*.pt"):  # the choice is made: free the disk
                if other != chosen:
                    other.unlink()
    best = choice.pooled[choice.epoch - 1]
    result = FitResult({}, choice.epoch, best["val_f1_macro"], best["val_loss"], history, seconds=seconds)
    result.selection = choice.selection
    return result, Network(network["weights"], tuple(network["mean"]), tuple(network["std"]))


def _finished_fold(marker: Path, fingerprint: str) -> dict | None:
    """A fold's record when it finished with these settings and data (resume skips it), else None."""
    try:
        done = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    return done if done.get("fingerprint") == fingerprint else None


@contextmanager
def _fold_run(work: Path, parent: str, backbone: str, fold: int, resume: bool) -> Iterator[str]:
    """Fold ``fold``'s child run of ``parent`` (the one it started, when resuming); yields its id."""
    run_file = work / "mlflow_run_id"
    previous = run_file.read_text().strip() if resume and run_file.is_file() else None
    tags = {"mlflow.parentRunId": parent, "cnmc.fold": str(fold), "backbone": backbone}
    with mlflow.start_run(run_id=previous, run_name=None if previous else f"{backbone}-fold{fold}", nested=True) as run:
        if not previous:
            mlflow.set_tags(tags)
            mkdir(work)
            run_file.write_text(run.info.run_id)
        yield run.info.run_id


def _epoch_keeper(
    model: torch.nn.Module, work: Path, log_epoch: Callable[[dict[str, float]], None]
) -> Callable[[dict[str, float]], None]:
    """An epoch callback that logs the epoch and keeps the model's weights after it
    (``epoch_<n>.pt``): the pooled choice of the epoch comes after all folds. A resumed fold's
    replayed epochs have their files already (the one epoch whose file may be missing, when a kill
    came between checkpoint and callback, is the checkpoint's own state, which the model holds)."""

    def keep(row: dict[str, float]) -> None:
        path = work / f"epoch_{int(row['epoch'])}.pt"
        if not path.is_file():
            tmp = path.with_name(path.name + ".tmp")
            torch.save(model.state_dict(), tmp)
            tmp.replace(path)
        log_epoch(row)

    return keep


def _epoch_logger(run_id: str) -> Callable[[dict[str, float]], None]:
    """An epoch callback logging each epoch's metrics to run ``run_id`` once (a resumed fit replays them)."""
    client = mlflow.tracking.MlflowClient()
    logged = {m.step for m in client.get_metric_history(run_id, "val_f1_macro")}

    def log_epoch(row: dict[str, float]) -> None:
        step = int(row["epoch"])
        if step not in logged:
            for key, value in row.items():
                if key != "epoch":
                    client.log_metric(run_id, key, value, step=step)
            logged.add(step)

    return log_epoch
