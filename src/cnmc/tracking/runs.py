"""Starting MLflow runs: one run context (:func:`tracked_run`) for every run and parent run
(training, evaluation, ensembles, tuning), named by who started it and tagged with its provenance;
and how an interrupted one ends (:func:`killed_on_interrupt`).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cnmc.core.config import SPLITS, Params
from cnmc.core.errors import CnmcError
from cnmc.tracking.provenance import data_hash, experiment_name, git_commit, tracking_uri

log = logging.getLogger(__name__)

DEFAULT_EXPERIMENT_ID = "0"  # MLflow's "Default", where `mlflow run` puts a run nobody placed


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
def tracked_run(
    experiment: str,
    run_name: str,
    resume_run: str | None = None,
    params: dict[str, Any] | None = None,
    tags: dict[str, str] | None = None,
    **start_kwargs: Any,
) -> Iterator[Any]:
    """The one way a cnmc MLflow run starts: in ``experiment``, tagged with its kind (and DVC
    experiment), with ``params`` and ``tags`` logged; with ``resume_run``, that run continued as it was.

    Under ``mlflow run`` the work is logged into the launcher's own run (one job, one run); where
    the launcher left it in MLflow's ``Default`` experiment, a warning says to pass
    ``--experiment-name`` so that promotion, which looks in ``experiment``, sees it.
    """
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    kind = run_kind()
    if resume_run:
        try:
            mlflow.tracking.MlflowClient().get_run(resume_run)
        except mlflow.exceptions.MlflowException:
            raise CnmcError(f"MLflow run {resume_run} is not in {tracking_uri()}: run `cnmc train` again") from None
    else:
        _warn_if_launched_into_default(experiment)
        if not os.environ.get("MLFLOW_RUN_ID"):
            try:
                mlflow.set_experiment(experiment)
            except mlflow.exceptions.MlflowException:  # another worker created it at the same moment
                mlflow.set_experiment(experiment)
    # A resumed run keeps its name (MLflow would rename it, and the kind read here may differ).
    with mlflow.start_run(run_id=resume_run, run_name=None if resume_run else run_name, **start_kwargs) as run:
        if not resume_run:
            mlflow.set_tags({"cnmc.kind": kind, "dvc.experiment": os.environ.get("DVC_EXP_NAME", "")} | (tags or {}))
            if params:
                mlflow.log_params(params)
        yield run


@contextmanager
def killed_on_interrupt(message: str) -> Iterator[None]:
    """Ctrl-C (``KeyboardInterrupt``) inside ends the active MLflow run as ``KILLED`` and becomes
    the one line ``message`` (a :class:`CnmcError`: what is kept and how to go on)."""
    import mlflow

    try:
        yield
    except KeyboardInterrupt:
        mlflow.end_run(status="KILLED")
        raise CnmcError(message) from None


PROVENANCE_TAGS = ("backbone", "protocol", "data_hash", "git_commit")


def provenance_tags(backbone: str, protocol: str) -> dict[str, str]:
    """What every run is tagged with to find its code and data again (:data:`PROVENANCE_TAGS`; a
    registry version whose run lacks one is not loaded, :mod:`cnmc.tracking.version_check`)."""
    return dict(zip(PROVENANCE_TAGS, (backbone, protocol, data_hash(), git_commit()), strict=True))


@contextmanager
def training_run(
    params: Params, backbone: str, resume_run: str | None, extra_params: dict[str, Any] | None = None
) -> Iterator[Any]:
    """A training (or ensemble) run in the protocol's experiment, named, tagged and described; with
    ``resume_run``, that run continued (evaluation continues the training run)."""
    protocol = params.split.protocol
    tags = provenance_tags(backbone, protocol)
    dhash = tags["data_hash"]
    tags["mlflow.note.content"] = _description(backbone, protocol, dhash)
    with tracked_run(
        experiment_name(protocol),
        f"{backbone}-{run_label()}-{dhash[:8]}",
        resume_run,
        params=flat_params(params, backbone) | (extra_params or {}),
        tags=tags,
        log_system_metrics=True,
    ) as run:
        yield run


def _description(backbone: str, protocol: str, dhash: str) -> str:
    split = (
        "subject-disjoint: test = unseen subjects"
        if protocol == "subject"
        else "the paper's cell-level 90/10 split: subjects shared, optimistic"
    )
    return f"{backbone} fine-tuned on C-NMC ({split}); data {dhash[:8]}. Headline: test_f1_all, test_roc_auc."


def flat_params(params: Params, backbone: str) -> dict[str, Any]:
    """Every config value as ``section.key`` (MLflow params), with this run's backbone."""
    flat: dict[str, Any] = {"seed": params.seed, "data_dir": params.data_dir, "backbone": backbone}
    for section in ("split", "augment", "train"):
        for key, value in getattr(params, section).model_dump().items():
            if section == "train" and key == "backbones":
                continue
            flat[f"{section}.{key}"] = value
    return flat


def store_hash(store: Path, splits: tuple[str, ...] = SPLITS) -> str:
    """Hash of the stores' index files: identifies the exact data of a run (tuning's trials see
    ``train`` and ``val`` only)."""
    digest = hashlib.sha256()
    for split in splits:
        digest.update((store / split / "index.csv").read_bytes())
    return digest.hexdigest()[:16]


def _warn_if_launched_into_default(experiment: str) -> None:
    """Say so when ``mlflow run`` launched this process into MLflow's ``Default`` experiment, where
    promotion (which looks in ``experiment``) will not find the run."""
    from mlflow import MlflowClient

    launcher = os.environ.get("MLFLOW_RUN_ID")
    if launcher and MlflowClient().get_run(launcher).info.experiment_id == DEFAULT_EXPERIMENT_ID:
        log.warning(
            "this run is in MLflow's Default experiment, where `cnmc promote` does not look: "
            "launch it with `mlflow run ... --experiment-name %s`",
            experiment,
        )
