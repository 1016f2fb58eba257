"""The ``train@<backbone>`` stage: fine-tune one backbone and log the fit to a new MLflow run.

It writes the weights, the uncalibrated ``model.json`` and ``fit.json`` (the run id and what the
fit found) to ``outputs/models/<backbone>``, and the training curves. Everything that judges the
model (temperature, threshold, test metrics, the logged pyfunc) is the evaluate stage's
(:mod:`cnmc.jobs.evaluate`), so that changing how a model is judged or served retrains nothing.
"""

from __future__ import annotations

import mlflow
import pandas as pd
import torch

from cnmc.core.atomic import atomic_write_text
from cnmc.core.config import Params
from cnmc.core.distributed import ONE_PROCESS, World
from cnmc.core.errors import CnmcError
from cnmc.inference.spec import ModelSpec
from cnmc.jobs.paths import RunPaths, mkdir, open_stores
from cnmc.metrics.document import FitSummary
from cnmc.plots.training import training_curves_png
from cnmc.tracking.runs import flat_params, store_hash, training_run
from cnmc.training.build import build_trainer
from cnmc.training.trainer import config_fingerprint


def fit_and_log(
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
    trainer, net = build_trainer(
        params,
        backbone,
        stores["train"],
        stores["val"],
        paths.checkpoint,
        fingerprint,
        weights_path=weights_path,
        progress=progress,
        world=world,
    )
    if not world.is_main:
        try:
            trainer.fit(resume=resume)
        except KeyboardInterrupt:
            raise CnmcError("interrupted: rank 0 keeps the last epoch's checkpoint") from None
        return None

    run_id_file = paths.checkpoint.with_name("mlflow_run_id")
    resume_run = run_id_file.read_text().strip() if resume and run_id_file.is_file() else None
    with training_run(
        params, backbone, resume_run, extra_params={"weights": net.weights, "world_size": world.size}
    ) as run:
        mkdir(paths.checkpoint.parent)
        run_id_file.write_text(run.info.run_id)
        logged_epochs = _logged_epochs(run.info.run_id)

        def on_epoch(row: dict[str, float]) -> None:
            if int(row["epoch"]) not in logged_epochs:
                mlflow.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=int(row["epoch"]))

        try:
            fit = trainer.fit(resume=resume, on_epoch=on_epoch)
        except KeyboardInterrupt:
            mlflow.end_run(status="KILLED")
            raise CnmcError(
                f"interrupted: the last epoch's checkpoint is in {paths.checkpoint}; rerun with --resume to continue"
            ) from None
        curves = training_curves_png(fit.history, mkdir(paths.curves.parent) / paths.curves.name)
        atomic_write_text(paths.history, pd.DataFrame(fit.history).to_csv(index=False, float_format="%.6g"))
        mlflow.log_artifact(str(curves), artifact_path="plots")
        model_dir = mkdir(paths.model_dir)
        torch.save(trainer.model.state_dict(), model_dir / "weights.pt")
        ModelSpec(backbone, stores["train"].image_size, net.mean, net.std, colour=params.train.colour).save(
            model_dir / "model.json"
        )
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
        )
        summary.save(paths.fit_file)
    return summary


def _logged_epochs(run_id: str) -> set[int]:
    history = mlflow.tracking.MlflowClient().get_metric_history(run_id, "val_f1_macro")
    return {m.step for m in history}
