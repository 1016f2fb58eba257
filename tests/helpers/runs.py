"""Tracked runs for tests: a place to train them (:class:`TrainingCopy`), the session's tiny runs
(:class:`TinyRuns`, :class:`TinyRun`), the champion among them (:class:`Champion`), and MLflow's
process-wide state put back (:func:`reset_mlflow`)."""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from helpers.params import tiny_params


def reset_mlflow() -> None:
    """End any active run (``KILLED``) and forget any in-process tracking URI; nothing where no
    test has imported MLflow yet (importing it takes seconds)."""
    mlflow = sys.modules.get("mlflow")
    if mlflow is None:
        return
    while mlflow.active_run() is not None:
        mlflow.end_run(status="KILLED")
    mlflow.set_tracking_uri(None)


@dataclass(frozen=True)
class TinyRun:
    """One real ``train_and_evaluate`` run (1 epoch, random init) in the shared ``tiny_runs`` store."""

    tracking_uri: str
    backbone: str
    run_id: str
    run_name: str
    experiment_id: str
    threshold: float

    @property
    def model_uri(self) -> str:
        return f"runs:/{self.run_id}/model"


class TrainingCopy:
    """Where tests train tracked runs: a writable copy of a prepared store (``root``, ``work/outputs``)
    and of the migrated MLflow store (``db``, ``work/mlflow.db``), both under ``work``."""

    def __init__(self, store: Path, db_template: Path, work: Path):
        self.work = work
        self.root = Path(shutil.copytree(store, work / "outputs"))
        self.db = work / "mlflow.db"
        shutil.copyfile(db_template, self.db)
        self.tracking_uri = f"sqlite:///{self.db}"

    def train(self, params: Any, backbone: str, patch: Callable[[pytest.MonkeyPatch], None] | None = None) -> Any:
        """``train_and_evaluate`` of ``backbone`` on this copy, logged to its MLflow store with the
        working directory ``work`` (``./mlruns``, the artifact root, lands here); ``patch`` may patch
        more for the call. Returns the metrics document."""
        import mlflow

        from cnmc.jobs.fit_evaluate import train_and_evaluate
        from cnmc.jobs.paths import RunPaths

        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("MLFLOW_TRACKING_URI", self.tracking_uri)
            mp.delenv("MLFLOW_RUN_ID", raising=False)
            mp.chdir(self.work)
            if patch is not None:
                patch(mp)
            try:
                return train_and_evaluate(params, backbone, RunPaths(self.root, backbone), progress=False)
            finally:
                mlflow.set_tracking_uri(None)


class TinyRuns(TrainingCopy):
    """Trains tiny runs on demand, one per backbone, into one temporary SQLite store (cached)."""

    def __init__(self, store: Path, db_template: Path, work: Path):
        super().__init__(store, db_template, work)
        self._runs: dict[str, TinyRun] = {}

    def __call__(self, backbone: str) -> TinyRun:
        if backbone not in self._runs:
            self._runs[backbone] = self._train(backbone)
        return self._runs[backbone]

    def _train(self, backbone: str) -> TinyRun:
        from mlflow.tracking import MlflowClient

        # Colour centring on: the served champion then shows that a model's input transform travels with it.
        document = self.train(tiny_params(colour="centred"), backbone)
        run = MlflowClient(tracking_uri=self.tracking_uri).get_run(document.run_id)
        return TinyRun(
            self.tracking_uri,
            backbone,
            run.info.run_id,
            run.info.run_name,
            run.info.experiment_id,
            float(document.threshold),
        )


@dataclass(frozen=True)
class Champion:
    """The tiny ``test_resnet`` run, registered and given the ``champion`` alias by ``cnmc promote``'s
    own :func:`cnmc.jobs.promote.promote`, in the ``tiny_runs`` store."""

    tracking_uri: str
    name: str
    version: str
    run_id: str
    backbone: str
    data_hash: str
    threshold: float
    temperature: float

    @property
    def model_uri(self) -> str:
        return f"models:/{self.name}@champion"
