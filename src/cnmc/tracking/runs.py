"""MLflow set-up shared by training, promotion and tuning.

One tracking store per project (``sqlite:///<root>/mlflow.db``), one experiment per split
protocol, and the tags that make a run traceable to its code and data.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

DB_NAME = "mlflow.db"
DEFAULT_EXPERIMENT_ID = "0"  # MLflow's "Default", where `mlflow run` puts a run nobody placed


def project_root() -> Path:
    """The project folder: DVC's ``DVC_ROOT`` inside a stage, else the working directory."""
    return Path(os.environ.get("DVC_ROOT", ".")).resolve()


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` if set, else the project's SQLite store."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root() / DB_NAME}"


def experiment_name(protocol: str) -> str:
    return f"cnmc-{protocol}"


def tuning_experiment_name(protocol: str) -> str:
    """Tuning's parent and trial runs live apart from the training runs that promotion ranks."""
    return f"cnmc-{protocol}-tuning"


def run_kind() -> str:
    """What started this process's run: ``experiment`` (``dvc exp run``, which names it in
    ``DVC_EXP_NAME``), ``pipeline`` (``dvc repro``: ``DVC_STAGE``), ``mlflow-run`` or ``ad-hoc``."""
    if os.environ.get("DVC_EXP_NAME"):
        return "experiment"
    if os.environ.get("DVC_STAGE"):
        return "pipeline"
    return "mlflow-run" if os.environ.get("MLFLOW_RUN_ID") else "ad-hoc"


def run_label() -> str:
    """The part of a run's name that tells who started it: the DVC experiment's name, or the kind."""
    return os.environ.get("DVC_EXP_NAME") or run_kind()


@contextmanager
def tracked_run(experiment: str, run_name: str, resume_run: str | None = None, **start_kwargs: Any) -> Iterator[Any]:
    """An MLflow run in ``experiment``, tagged with its kind (and DVC experiment); with
    ``resume_run``, that run continued.

    Under ``mlflow run`` the launcher's run is used when the user placed it (``--experiment-name``);
    one it left in ``Default`` is set aside instead, tagged with a link to the run logged here, so
    that ``mlflow run`` and ``cnmc train`` land in the same experiment and promotion sees both.
    """
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    kind, launcher = run_kind(), None
    if not resume_run:
        launcher = _unplaced_launcher()
        if not os.environ.get("MLFLOW_RUN_ID"):
            try:
                mlflow.set_experiment(experiment)
            except mlflow.exceptions.MlflowException:  # another worker created it at the same moment
                mlflow.set_experiment(experiment)
    # A resumed run keeps its name (MLflow would rename it, and the kind read here may differ).
    with mlflow.start_run(run_id=resume_run, run_name=None if resume_run else run_name, **start_kwargs) as run:
        if not resume_run:
            mlflow.set_tags({"cnmc.kind": kind} | {"dvc.experiment": os.environ.get("DVC_EXP_NAME", "")})
        if launcher:
            mlflow.MlflowClient().set_tag(launcher, "cnmc.logged_to", f"{experiment}: run {run.info.run_id}")
        yield run


def _unplaced_launcher() -> str | None:
    """The id of an ``mlflow run`` launcher's run left in ``Default``, taken out of this process's
    environment (None: no launcher, or one the user placed)."""
    from mlflow import MlflowClient

    launcher = os.environ.get("MLFLOW_RUN_ID")
    if not launcher or MlflowClient().get_run(launcher).info.experiment_id != DEFAULT_EXPERIMENT_ID:
        return None
    del os.environ["MLFLOW_RUN_ID"]
    return launcher


def git_commit(root: Path | None = None) -> str:
    """The checked-out commit (with ``-dirty`` if the tree has changes), or ``unknown``."""
    cwd = root or project_root()
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{commit}-dirty" if dirty else commit


def data_hash(root: Path | None = None) -> str:
    """The md5 that ``data.dvc`` records for ``data/``, or ``untracked`` without one."""
    path = (root or project_root()) / "data.dvc"
    try:
        outs = yaml.safe_load(path.read_text())["outs"]
        return str(outs[0]["md5"]).removesuffix(".dir")
    except (OSError, KeyError, IndexError, TypeError, yaml.YAMLError):
        return "untracked"
