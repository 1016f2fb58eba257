"""Optuna search over the learning rate and the augmentation strength (``cnmc tune``).

Each trial trains ``tune.backbone`` for ``tune.epochs`` epochs; its value is the best validation
macro F1 (the test split is never opened). Every epoch is reported to Optuna, which may prune.
The study lives in ``tune.storage`` (see :func:`make_storage`): a journal file by default, so a
second call, or several worker processes at once on one machine or a shared disk, add trials to
the same study; an RDB URL (PostgreSQL) does the same for workers on many machines. Each call is
one MLflow parent run with a nested run per trial; the parent gets the study's best
``lr``/``strength``, its history and importance plots.

Strength without rewriting the store: a trial trains on the augment stage's balanced set with
each augmented image swapped for T(its original) at the trial's strength, drawn on the fly each
epoch. Every epoch keeps the offline composition (per class: the originals untouched plus M - n
T copies, same round-robin origins), so the tuned strength means what it means in ``cnmc augment``.

Trials start from the same initial weights and see the same data order (``seed``), so they differ
only by ``lr`` and ``strength``. The TPE sampler is seeded with ``seed`` + the number of the
process's first trial: a resumed study or a second worker does not replay earlier points.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import yaml
from optuna.exceptions import ExperimentalWarning
from optuna.samplers import BaseSampler, TPESampler
from optuna.trial import FrozenTrial, TrialState

from cnmc.core.atomic import atomic_write_text
from cnmc.core.config import Params, journal_path
from cnmc.core.errors import CnmcError
from cnmc.data.store import ImageStore
from cnmc.training.crossfit import fold_count, fold_stores

log = logging.getLogger(__name__)

OBJECTIVE = "val_f1_macro"
# Trial failures that end the trial, not the study: a diverging loss (FloatingPointError from the
# trainer), CUDA out-of-memory and other runtime errors (torch raises RuntimeError subclasses).
TRIAL_ERRORS: tuple[type[BaseException], ...] = (FloatingPointError, RuntimeError, MemoryError)
SQLITE_TIMEOUT_S = 30  # wait this long for another writer's lock instead of failing
OPEN_ATTEMPTS = 5


class TrialFailed(RuntimeError):
    """A trial ended by one of :data:`TRIAL_ERRORS`; the message is ``Type: reason``."""


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


# --------------------------------------------------------------------------- the study


def run_study(params: Params, store_root: Path, n_trials: int | None = None, progress: bool = True) -> StudySummary:
    """Run ``n_trials`` (default ``tune.n_trials``) more trials of the study, tracked in MLflow.

    ``store_root`` is the image store folder (``outputs/images``, with ``train/`` and ``val/``).
    """
    import mlflow

    from cnmc.tracking.provenance import tracking_uri

    started = time.perf_counter()
    cfg = params.tune
    n_trials = cfg.n_trials if n_trials is None else int(n_trials)
    _check_ranges(params, n_trials)
    store_root = Path(store_root)
    # Online augmentation stores originals only: every row gets T; offline, the stored balancing is replayed.
    stored, val = ImageStore(store_root / "train"), ImageStore(store_root / "val")
    train = stored if params.augment.online else live_augmentation_view(stored)
    if fold_count(val):  # cross-fitted: a trial trains on the other folds' people and is judged on fold 0's
        train, val = fold_stores(train, val, 0)
    study = open_study(params)

    mlflow.set_tracking_uri(tracking_uri())
    with _parent_run(params, store_root, n_trials) as parent:
        objective = _Objective(params, train, val, progress)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ExperimentalWarning)  # heartbeat
                study.optimize(objective, n_trials=n_trials, catch=(TrialFailed,))
        except KeyboardInterrupt:
            mlflow.end_run(status="KILLED")
            raise CnmcError(
                f"interrupted: the finished trials stay in study '{cfg.study_name}' "
                f"({_safe_storage(cfg.storage)}); run `cnmc tune` again to add more"
            ) from None
        summary = _summary(study, params, objective.trials_run, parent.info.run_id, started)
        _log_study(study, summary)
    return summary


def open_study(params: Params) -> optuna.Study:
    """Create the study, or load it if it exists (workers and later calls share it)."""
    from sqlalchemy import exc as sa_exc

    cfg = params.tune
    for attempt in range(1, OPEN_ATTEMPTS + 1):
        try:
            study = optuna.create_study(
                storage=make_storage(cfg.storage, cfg.heartbeat_s),
                study_name=cfg.study_name,
                direction="maximize",
                load_if_exists=True,
                sampler=_FirstTrialSeededTPE(params.seed),
                pruner=build_pruner(params),
            )
            break
        except (sa_exc.OperationalError, sa_exc.IntegrityError, optuna.exceptions.StorageInternalError) as exc:
            # Two workers creating the tables at once, a database server not up yet: try again.
            if attempt == OPEN_ATTEMPTS:
                raise CnmcError(
                    f"tune.storage {_safe_storage(cfg.storage)!r}: cannot open the Optuna storage "
                    f"({exc.__class__.__name__}: {exc})"
                ) from exc
            time.sleep(0.5 * attempt)
        except (sa_exc.SQLAlchemyError, ImportError) as exc:
            raise CnmcError(
                f"tune.storage {_safe_storage(cfg.storage)!r}: not a usable database URL "
                f"({exc.__class__.__name__}: {exc})"
            ) from exc
        except json.JSONDecodeError:  # a journal line torn by a worker killed mid-write
            raise CnmcError(torn_journal(journal_path(cfg.storage))) from None
        except OSError as exc:  # a journal (or SQLite) file that cannot be created or written
            raise CnmcError(
                f"tune.storage {_safe_storage(cfg.storage)!r}: cannot open the Optuna storage "
                f"({exc.__class__.__name__}: {exc})"
            ) from exc
    if study.direction != optuna.study.StudyDirection.MAXIMIZE:
        raise CnmcError(
            f"study '{cfg.study_name}' in {_safe_storage(cfg.storage)} minimises; use another tune.study_name"
        )
    # One study, one objective: trials of another backbone or length would not be comparable.
    for key, value in (("backbone", cfg.backbone), ("epochs", cfg.epochs)):
        existing = study.user_attrs.get(key)
        if existing is None:
            study.set_user_attr(key, value)
        elif existing != value:
            raise CnmcError(
                f"study '{cfg.study_name}' tunes {key} {existing!r}, but tune.{key} is {value!r}; "
                "use another tune.study_name (or delete the study)"
            )
    return study


def torn_journal(journal: Path | None) -> str:
    """The one line for a journal Optuna cannot parse: which line, and how to recover."""
    where = str(journal)
    lines = journal.read_text(encoding="utf-8", errors="replace").splitlines() if journal and journal.is_file() else []
    for number, line in enumerate(lines, 1):
        try:
            json.loads(line)
        except json.JSONDecodeError:
            return (
                f"{where}: line {number} of the Optuna journal is not whole JSON (a worker killed while writing?): "
                f"keep a copy, then delete that line (sed -i '{number}d' {where}) and run again"
            )
    return f"{where}: the Optuna journal cannot be read as JSON lines: keep a copy and repair or remove it"


def make_storage(setting: str, heartbeat_s: int = 60) -> optuna.storages.BaseStorage:
    """The Optuna storage a ``tune.storage`` setting names (the one place that reads it).

    ``journal:PATH``: a journal file that parallel workers on one machine or a shared disk append
    to under a lock file; Optuna advises it over SQLite, whose one write lock makes concurrent
    workers wait or fail. The lock is an ``O_EXCL`` file (``JournalFileOpenLock``): safe on local
    disks and NFSv3+, and unlike the default symlink lock it needs no privilege on Windows.
    Journals have no heartbeat: the trial of a killed worker stays ``running``.

    Anything else is an RDB URL: PostgreSQL (or MySQL) for workers on many machines, SQLite for
    one worker at a time. The heartbeat (every ``heartbeat_s``, ``tune.heartbeat_s``) lets a dead
    worker's trial be marked failed once two beats are missed, when the next trial of any worker starts.
    """
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock, JournalStorage

    journal = journal_path(setting)
    if journal is not None:
        journal.parent.mkdir(parents=True, exist_ok=True)
        file = str(journal)
        return JournalStorage(JournalFileBackend(file, lock_obj=JournalFileOpenLock(file)))
    engine_kwargs: dict[str, Any] = {}
    if setting.startswith("sqlite:///"):
        path = setting.removeprefix("sqlite:///").split("?", 1)[0]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine_kwargs["connect_args"] = {"timeout": SQLITE_TIMEOUT_S}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)  # heartbeat_interval
        return optuna.storages.RDBStorage(setting, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat_s)


def build_pruner(params: Params) -> optuna.pruners.BasePruner:
    """``tune.pruner``: median stops a trial below the median of earlier trials at the same epoch,
    once 3 trials have completed, from the second epoch on (the first is too noisy)."""
    if params.tune.pruner == "none":
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=2)


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


# --------------------------------------------------------------------------- one trial


class _Objective:
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


class _FirstTrialSeededTPE(BaseSampler):
    """TPE seeded with ``seed`` + the number of the first trial this process runs.

    The number comes from the storage when the trial is created, so it is known before anything is
    sampled: one worker resuming a study of n trials uses ``seed + n`` (reproducible), and two
    workers starting together get different numbers, hence different seeds and points.
    """

    def __init__(self, seed: int):
        self.seed = seed
        self._tpe: TPESampler | None = None

    @property
    def tpe(self) -> TPESampler:
        if self._tpe is None:
            self._tpe = TPESampler(seed=self.seed)
        return self._tpe

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if self._tpe is None:
            self._tpe = TPESampler(seed=self.seed + trial.number)
        self.tpe.before_trial(study, trial)

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, Any]:
        return self.tpe.infer_relative_search_space(study, trial)

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, Any]) -> dict[str, Any]:
        return self.tpe.sample_relative(study, trial, search_space)

    def sample_independent(
        self, study: optuna.Study, trial: FrozenTrial, param_name: str, param_distribution: Any
    ) -> Any:
        return self.tpe.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(
        self, study: optuna.Study, trial: FrozenTrial, state: TrialState, values: Sequence[float] | None
    ) -> None:
        self.tpe.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.tpe.reseed_rng()


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
    tune_params["tune.storage"] = _safe_storage(cfg.storage)
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
        storage=_safe_storage(cfg.storage),
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


# --------------------------------------------------------------------------- helpers


def _check_ranges(params: Params, n_trials: int) -> None:
    cfg = params.tune
    if n_trials < 1:
        raise CnmcError(f"n_trials must be at least 1, got {n_trials}")
    if cfg.lr_min > cfg.lr_max:
        raise CnmcError(f"tune.lr_min ({cfg.lr_min:g}) is above tune.lr_max ({cfg.lr_max:g})")
    if cfg.strength_min > cfg.strength_max:
        raise CnmcError(f"tune.strength_min ({cfg.strength_min:g}) is above tune.strength_max ({cfg.strength_max:g})")


def _safe_storage(url: str) -> str:
    """``tune.storage`` as logs, MLflow and tuned.yaml show it: a journal path as given, an RDB URL
    with any password masked."""
    if journal_path(url) is not None:
        return url
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not a URL SQLAlchemy can parse: show the scheme only
        return url.split("://", 1)[0] + "://..." if "@" in url else url
