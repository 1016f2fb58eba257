"""The Optuna study of ``cnmc tune``: its storage, sampler and pruner, and creating or resuming it.

The study lives in ``tune.storage`` (see :func:`make_storage`): a journal file by default, so a
second call, or several worker processes at once on one machine or a shared disk, add trials to
the same study; an RDB URL (PostgreSQL) does the same for workers on many machines. A journal line
torn by a worker killed mid-write is named with its repair (:func:`torn_journal`).

The TPE sampler is seeded with ``seed`` + the number of the process's first trial
(:class:`_FirstTrialSeededTPE`): a resumed study or a second worker does not replay earlier points.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna
from optuna.exceptions import ExperimentalWarning
from optuna.samplers import BaseSampler, TPESampler
from optuna.trial import FrozenTrial, TrialState

from cnmc.core.config import Params, journal_path
from cnmc.core.errors import CnmcError

SQLITE_TIMEOUT_S = 30  # wait this long for another writer's lock instead of failing
OPEN_ATTEMPTS = 5


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
                    f"tune.storage {safe_storage(cfg.storage)!r}: cannot open the Optuna storage "
                    f"({exc.__class__.__name__}: {exc})"
                ) from exc
            time.sleep(0.5 * attempt)
        except (sa_exc.SQLAlchemyError, ImportError) as exc:
            raise CnmcError(
                f"tune.storage {safe_storage(cfg.storage)!r}: not a usable database URL "
                f"({exc.__class__.__name__}: {exc})"
            ) from exc
        except json.JSONDecodeError:  # a journal line torn by a worker killed mid-write
            raise CnmcError(torn_journal(journal_path(cfg.storage))) from None
        except OSError as exc:  # a journal (or SQLite) file that cannot be created or written
            raise CnmcError(
                f"tune.storage {safe_storage(cfg.storage)!r}: cannot open the Optuna storage "
                f"({exc.__class__.__name__}: {exc})"
            ) from exc
    if study.direction != optuna.study.StudyDirection.MAXIMIZE:
        raise CnmcError(
            f"study '{cfg.study_name}' in {safe_storage(cfg.storage)} minimises; use another tune.study_name"
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


def safe_storage(url: str) -> str:
    """``tune.storage`` as logs, MLflow and tuned.yaml show it: a journal path as given, an RDB URL
    with any password masked."""
    if journal_path(url) is not None:
        return url
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not a URL SQLAlchemy can parse: show the scheme only
        return url.split("://", 1)[0] + "://..." if "@" in url else url


def build_pruner(params: Params) -> optuna.pruners.BasePruner:
    """``tune.pruner``: median stops a trial below the median of earlier trials at the same epoch,
    once 3 trials have completed, from the second epoch on (the first is too noisy)."""
    if params.tune.pruner == "none":
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=2)


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
