"""Optuna search over the learning rate and the augmentation strength (``cnmc tune``).

Each call is one MLflow parent run (:func:`run_study`) with a nested run per trial; the parent gets
the study's best ``lr``/``strength``, its history and importance plots, and the summary the CLI
prints and writes as ``tuned.yaml`` (:class:`StudySummary`, :func:`write_tuned_params`).

The study, where it lives and how it is shared by workers and later calls, is
:mod:`cnmc.jobs.tune_study`; one trial, what it trains on and its objective (the best validation
macro F1; the test split is never opened), :mod:`cnmc.jobs.tune_trial`.
"""

from __future__ import annotations

import logging
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import yaml
from optuna.exceptions import ExperimentalWarning
from optuna.trial import TrialState

from cnmc.core.atomic import atomic_write_text
from cnmc.core.config import Params
from cnmc.core.errors import CnmcError
from cnmc.jobs.tune_study import open_study, safe_storage
from cnmc.jobs.tune_trial import TrialFailed, TrialObjective, trial_stores

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StudySummary:
    """The study after one ``run_study`` call; ``str()`` is the line the CLI prints."""

    study_name: str
    storage: str  # tune.storage, any password hidden
    backbone: str
    epochs: int  # per trial
    best_trial: int | None  # None: no trial of the study has completed
    best_value: float | None  # best validation macro F1
    best_params: dict[str, float] = field(default_factory=dict)  # {"lr": .., "strength": ..}
    trials_run: int = 0  # by this call
    states: dict[str, int] = field(default_factory=dict)  # whole study: complete/pruned/fail/running
    parent_run_id: str | None = None
    seconds: float = 0.0

    @property
    def n_trials(self) -> int:
        return sum(self.states.values())

    @property
    def best_lr(self) -> float | None:
        return self.best_params.get("lr")

    @property
    def best_strength(self) -> float | None:
        return self.best_params.get("strength")

    def __str__(self) -> str:
        counts = ", ".join(f"{n} {state}" for state, n in self.states.items() if n)
        head = (
            f"tune: study '{self.study_name}' ({self.backbone}, {self.epochs} epoch(s) per trial): "
            f"{self.trials_run} trial(s) run, {self.n_trials} in the study ({counts or 'none'})"
        )
        if self.best_trial is None:
            return f"{head}; no completed trial yet"
        return (
            f"{head}; best trial {self.best_trial}: val macro F1 {self.best_value:.4f} at "
            f"lr {self.best_lr:.3g}, strength {self.best_strength:.3g} ({self.seconds:.1f} s)"
        )


def run_study(params: Params, store_root: Path, n_trials: int | None = None, progress: bool = True) -> StudySummary:
    """Run ``n_trials`` (default ``tune.n_trials``) more trials of the study, tracked in MLflow.

    ``store_root`` is the image store folder (``outputs/images``, with ``train/`` and ``val/``).
    """
    import mlflow

    from cnmc.tracking.provenance import tracking_uri
    from cnmc.tracking.runs import killed_on_interrupt

    started = time.perf_counter()
    cfg = params.tune
    n_trials = cfg.n_trials if n_trials is None else int(n_trials)
    _check_ranges(params, n_trials)
    store_root = Path(store_root)
    train, val = trial_stores(params, store_root)
    study = open_study(params)

    mlflow.set_tracking_uri(tracking_uri())
    with _parent_run(params, store_root, n_trials) as parent:
        objective = TrialObjective(params, train, val, progress)
        interrupted = (
            f"interrupted: the finished trials stay in study '{cfg.study_name}' "
            f"({safe_storage(cfg.storage)}); run `cnmc tune` again to add more"
        )
        with killed_on_interrupt(interrupted), warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)  # heartbeat
            study.optimize(objective, n_trials=n_trials, catch=(TrialFailed,))
        summary = _summary(study, params, objective.trials_run, parent.info.run_id, started)
        _log_study(study, summary)
    return summary


def _check_ranges(params: Params, n_trials: int) -> None:
    cfg = params.tune
    if n_trials < 1:
        raise CnmcError(f"n_trials must be at least 1, got {n_trials}")
    if cfg.lr_min > cfg.lr_max:
        raise CnmcError(f"tune.lr_min ({cfg.lr_min:g}) is above tune.lr_max ({cfg.lr_max:g})")
    if cfg.strength_min > cfg.strength_max:
        raise CnmcError(f"tune.strength_min ({cfg.strength_min:g}) is above tune.strength_max ({cfg.strength_max:g})")


# --------------------------------------------------------------------------- MLflow


@contextmanager
def _parent_run(params: Params, store_root: Path, n_trials: int) -> Iterator[Any]:

    from cnmc.tracking.provenance import tuning_experiment_name
    from cnmc.tracking.runs import flat_params, provenance_tags, run_label, store_hash, tracked_run

    cfg, protocol = params.tune, params.split.protocol
    base = flat_params(params, cfg.backbone)
    for tuned in ("train.lr", "augment.strength", "train.epochs"):  # set per trial, not from here
        base.pop(tuned, None)
    tune_params = {f"tune.{k}": v for k, v in cfg.model_dump().items()}
    tune_params["tune.storage"] = safe_storage(cfg.storage)
    tags = provenance_tags(cfg.backbone, protocol) | {
        "store_hash": store_hash(store_root, ("train", "val")),
        "optuna.study": cfg.study_name,
        "cnmc.stage": "tune",
        "mlflow.note.content": (
            f"Optuna study '{cfg.study_name}': lr (log) in [{cfg.lr_min:g}, {cfg.lr_max:g}], augmentation "
            f"strength in [{cfg.strength_min:g}, {cfg.strength_max:g}]; {cfg.backbone}, {cfg.epochs} epoch(s) "
            "per trial; objective: best validation macro F1. One nested run per trial."
        ),
    }
    name = f"tune-{cfg.study_name}-{cfg.backbone}-{run_label()}"
    with tracked_run(
        tuning_experiment_name(protocol), name, params=base | tune_params | {"n_trials": n_trials}, tags=tags
    ) as run:
        yield run


def _log_study(study: optuna.Study, summary: StudySummary) -> None:
    """Best params/value, the trials table, tuned.yaml and the Optuna plots, on the parent run."""
    import mlflow

    mlflow.log_metrics({f"trials_{state}": n for state, n in summary.states.items()})
    mlflow.log_metric("trials_run", summary.trials_run)
    if summary.best_trial is None:
        mlflow.set_tag("best_trial", "none")
        log.warning("study '%s': no completed trial yet, nothing to report as best", summary.study_name)
        return
    best = {
        "best_lr": summary.best_lr,
        "best_strength": summary.best_strength,
        "best_val_f1_macro": summary.best_value,
        "best_trial": summary.best_trial,
    }
    mlflow.log_metrics({k: float(v) for k, v in best.items() if v is not None})
    mlflow.set_tag("best_trial", str(summary.best_trial))
    mlflow.log_text(render_tuned_params(summary), "tuned.yaml")
    mlflow.log_text(study.trials_dataframe().to_csv(index=False), "trials.csv")
    from optuna.visualization import matplotlib as optuna_plots

    _log_plot(lambda: optuna_plots.plot_optimization_history(study), "optimization_history.png")
    if summary.states.get("complete", 0) >= 2:
        _log_plot(lambda: optuna_plots.plot_param_importances(study), "param_importances.png")
    else:
        mlflow.set_tag("param_importances", "skipped: needs 2 completed trials")


def _log_plot(make: Callable[[], Any], name: str) -> None:
    """Draw an Optuna matplotlib plot and log it as ``plots/<name>``; a failure only warns."""
    import matplotlib.pyplot as plt
    import mlflow

    fig = None
    try:
        with warnings.catch_warnings(), plt.rc_context():  # Optuna sets a style: keep it local
            warnings.simplefilter("ignore", ExperimentalWarning)
            warnings.simplefilter("ignore", UserWarning)  # e.g. PED-ANOVA on few trials: equal importances
            ax = make()
            ax = ax.flat[0] if isinstance(ax, np.ndarray) else ax
            fig = ax.figure
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / name
                fig.savefig(path, dpi=120, bbox_inches="tight")
                mlflow.log_artifact(str(path), artifact_path="plots")
    except Exception as exc:  # noqa: BLE001 - a plot must never lose the study's results
        log.warning("could not draw %s: %s: %s", name, exc.__class__.__name__, exc)
        mlflow.set_tag(f"plot_error.{Path(name).stem}", f"{exc.__class__.__name__}: {exc}"[:500])
    finally:
        if fig is not None:
            plt.close(fig)


# --------------------------------------------------------------------------- results


def _summary(study: optuna.Study, params: Params, trials_run: int, run_id: str | None, started: float) -> StudySummary:
    trials = study.get_trials(deepcopy=False)
    names = {
        TrialState.COMPLETE: "complete",
        TrialState.PRUNED: "pruned",
        TrialState.FAIL: "failed",
        TrialState.RUNNING: "running",
        TrialState.WAITING: "waiting",
    }
    states = {name: sum(t.state == state for t in trials) for state, name in names.items()}
    complete = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
    best = max(complete, key=lambda t: (t.value, -t.number)) if complete else None
    cfg = params.tune
    return StudySummary(
        study_name=cfg.study_name,
        storage=safe_storage(cfg.storage),
        backbone=cfg.backbone,
        epochs=cfg.epochs,
        best_trial=best.number if best else None,
        best_value=float(best.value) if best and best.value is not None else None,
        best_params={k: float(v) for k, v in best.params.items()} if best else {},
        trials_run=trials_run,
        states=states,
        parent_run_id=run_id,
        seconds=time.perf_counter() - started,
    )


def render_tuned_params(summary: StudySummary, path: Path | str = "tuned.yaml") -> str:
    """The text of ``tuned.yaml`` (written to ``path``, which its hint names): the best ``train.lr``
    and ``augment.strength``, with comments."""
    if summary.best_trial is None or summary.best_lr is None or summary.best_strength is None:
        raise CnmcError(
            f"study '{summary.study_name}' has no completed trial: nothing to write "
            "(see the failed/pruned trials in MLflow, then run `cnmc tune` again)"
        )
    counts = ", ".join(f"{n} {state}" for state, n in summary.states.items() if n)

    def one_line(text: str) -> str:
        return " ".join(str(text).split())

    header = [
        f"# Tuned by Optuna (`cnmc tune`): study {one_line(summary.study_name)!r} in {one_line(summary.storage)}",
        f"# backbone {one_line(summary.backbone)}, {summary.epochs} epoch(s) per trial; "
        f"{summary.n_trials} trial(s) ({counts})",
        f"# best: trial {summary.best_trial}, validation macro F1 {summary.best_value:.6f} "
        "(the objective; no test metric was used)",
    ]
    if summary.parent_run_id:
        header.append(f"# MLflow parent run {summary.parent_run_id}")
    header.append(f"# Use with: cnmc train --params-from {path}")
    body = yaml.safe_dump(
        {"train": {"lr": summary.best_lr}, "augment": {"strength": summary.best_strength}},
        sort_keys=False,
        default_flow_style=False,
    )
    return "\n".join(header) + "\n" + body


def write_tuned_params(summary: StudySummary, path: Path) -> None:
    """Write ``tuned.yaml`` (see :func:`render_tuned_params`) atomically."""
    atomic_write_text(Path(path), render_tuned_params(summary, path))
