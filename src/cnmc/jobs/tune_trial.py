"""One trial of ``cnmc tune``: what it trains on, its training, and its objective.

Each trial trains ``tune.backbone`` for ``tune.epochs`` epochs in a nested MLflow run
(:class:`TrialObjective`); its value is the best validation macro F1 (the test split is never
opened). Every epoch is reported to Optuna, which may prune.

Strength without rewriting the store: a trial trains on the augment stage's balanced set with
each augmented image swapped for T(its original) at the trial's strength, drawn on the fly each
epoch (:func:`live_augmentation_view`). Every epoch keeps the offline composition (per class: the
originals untouched plus M - n T copies, same round-robin origins), so the tuned strength means
what it means in ``cnmc augment``.

Trials start from the same initial weights and see the same data order (``seed``), so they differ
only by ``lr`` and ``strength``.
"""

from __future__ import annotations

import gc
import logging
import math
import tempfile
from pathlib import Path

import numpy as np
import optuna

from cnmc.core.config import Params
from cnmc.core.errors import CnmcError
from cnmc.data.store import ImageStore
from cnmc.training.crossfit import fold_count, fold_stores

log = logging.getLogger(__name__)

OBJECTIVE = "val_f1_macro"
# Trial failures that end the trial, not the study: a diverging loss (FloatingPointError from the
# trainer), CUDA out-of-memory and other runtime errors (torch raises RuntimeError subclasses).
TRIAL_ERRORS: tuple[type[BaseException], ...] = (FloatingPointError, RuntimeError, MemoryError)


class TrialFailed(RuntimeError):
    """A trial ended by one of :data:`TRIAL_ERRORS`; the message is ``Type: reason``."""


def trial_stores(params: Params, store_root: Path) -> tuple[ImageStore, ImageStore]:
    """What every trial trains and is judged on, from the image store folder ``store_root``
    (``outputs/images``, with ``train/`` and ``val/``)."""
    # Online augmentation stores originals only: every row gets T; offline, the stored balancing is replayed.
    stored, val = ImageStore(store_root / "train"), ImageStore(store_root / "val")
    train = stored if params.augment.online else live_augmentation_view(stored)
    if fold_count(val):  # cross-fitted: a trial trains on the other folds' people and is judged on fold 0's
        train, val = fold_stores(train, val, 0)
    return train, val


def live_augmentation_view(train: ImageStore) -> ImageStore:
    """The augment stage's balanced training set with each augmented image replaced by its
    original, marked for an on-the-fly transform (see the module docstring)."""
    index = train.index
    where = train.split_dir / "index.csv"
    if not {"augmented", "origin"} <= set(index.columns):
        raise CnmcError(f"{where}: no 'augmented'/'origin' columns (rerun `cnmc augment`)")
    try:
        augmented = index["augmented"].astype(np.int64).to_numpy() == 1
        origin = index["origin"].astype(np.int64).to_numpy()
    except ValueError as exc:
        raise CnmcError(f"{where}: 'augmented' and 'origin' must be integers") from exc
    rows = np.where(augmented, origin, np.arange(len(index)))
    if len(rows) and (rows.min() < 0 or rows.max() >= len(index) or augmented[rows].any()):
        raise CnmcError(f"{where}: an augmented row's 'origin' is not an original row (rerun `cnmc augment`)")
    return train.subset(rows, transform_mask=augmented)


class TrialObjective:
    """Train one trial in a nested MLflow run; return its best validation macro F1."""

    def __init__(self, params: Params, train: ImageStore, val: ImageStore, progress: bool):
        self.params, self.train, self.val, self.progress = params, train, val, progress
        self.trials_run = 0

    def __call__(self, trial: optuna.Trial) -> float:
        import mlflow

        cfg = self.params.tune
        lr = trial.suggest_float("lr", cfg.lr_min, cfg.lr_max, log=True)
        strength = trial.suggest_float("strength", cfg.strength_min, cfg.strength_max)
        self.trials_run += 1
        mlflow.start_run(run_name=f"trial-{trial.number}", nested=True)
        mlflow.log_params(
            {
                "lr": lr,
                "strength": strength,
                "backbone": cfg.backbone,
                "trial": trial.number,
                "epochs": cfg.epochs,
                "study": cfg.study_name,
            }
        )
        mlflow.set_tags(
            {
                "backbone": cfg.backbone,
                "protocol": self.params.split.protocol,
                "optuna.study": cfg.study_name,
                "optuna.trial": str(trial.number),
                "state": "running",
            }
        )
        failure: str | None = None
        pruned: str | None = None
        try:
            value = self._fit(trial, lr, strength)
        except optuna.TrialPruned as exc:
            pruned = str(exc)
        except TRIAL_ERRORS as exc:
            failure = f"{exc.__class__.__name__}: {exc}"
            log.warning("trial %d failed: %s", trial.number, failure, exc_info=True)
        except KeyboardInterrupt:
            _end_trial_run("failed", "interrupted", status="KILLED")
            raise
        except BaseException as exc:
            _end_trial_run("failed", f"{exc.__class__.__name__}: {exc}")
            raise
        finally:
            _release_memory()  # out of the except blocks: the failed trial's tensors are unreferenced
        if pruned is not None:
            _end_trial_run("pruned")
            raise optuna.TrialPruned(pruned)
        if failure is not None:
            trial.set_user_attr("failure_reason", failure)
            _end_trial_run("failed", failure)
            raise TrialFailed(failure)
        mlflow.log_metric("best_val_f1_macro", value)
        _end_trial_run("complete")
        return value

    def _fit(self, trial: optuna.Trial, lr: float, strength: float) -> float:
        import mlflow

        from cnmc.training.build import build_trainer

        params, cfg = self.params, self.params.tune
        train_cfg = params.train.model_copy(update={"epochs": cfg.epochs, "lr": lr})
        trial_params = params.model_copy(update={"train": train_cfg})  # every trial starts from the same weights

        def on_epoch(row: dict[str, float]) -> None:
            epoch, value = int(row["epoch"]), float(row[OBJECTIVE])
            mlflow.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=epoch)
            trial.report(value, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at epoch {epoch}: {OBJECTIVE} {value:.4f}")

        with tempfile.TemporaryDirectory(prefix="cnmc-tune-") as tmp:  # this trial's own checkpoint
            trainer, _ = build_trainer(
                trial_params,
                cfg.backbone,
                self.train,
                self.val,
                Path(tmp) / "checkpoint.pt",
                f"tune-{trial.number}",
                strength=strength,
                progress=self.progress,
            )
            fit = trainer.fit(on_epoch=on_epoch)
        if not math.isfinite(fit.best_val_f1_macro) or fit.best_epoch < 1:
            raise FloatingPointError(f"no finite {OBJECTIVE} in {len(fit.history)} epoch(s)")
        mlflow.log_metric("best_epoch", fit.best_epoch)
        return fit.best_val_f1_macro


def _end_trial_run(state: str, reason: str | None = None, status: str | None = None) -> None:
    import mlflow

    mlflow.set_tag("state", state)
    if reason:
        mlflow.set_tag("failure_reason", reason[:5000])
    status = status or ("FAILED" if state == "failed" else "FINISHED")
    mlflow.end_run(status=status)


def _release_memory() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001 - best effort only
        pass
