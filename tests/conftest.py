"""Shared fixtures: a tiny prepared image store (made once per session through the real
pipeline functions), a temporary SQLite MLflow store (migrated once, copied per test), a place to
train tracked runs in (:class:`TrainingCopy`), tiny tracked runs, and the champion among them
served by ``cnmc serve`` and ``mlflow models serve`` (each started once a session, when a test
first asks for it)."""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

SEED = 42

# 3 training subjects per class (one per fold), 1 preliminary-test subject per class.
TINY_SYNTHETIC = {
    "train_subjects_per_class": 3,
    "prelim_subjects_per_class": 1,
    "all_cells_per_subject": 4,
    "hem_cells_per_subject": 3,
    "final_images": 1,
    "image_size": 96,
}
# The offline store (M images a class stored): what most data tests look at; online is tested apart.
TINY_AUGMENT = {"image_size": 32, "per_class": 16, "workers": 1, "online": False}


def tiny_params(min_images_per_class: int = 1, **train: object):
    """Defaults with the tiny store's augment settings and a fast, random-init CPU training (1 epoch).

    The tiny validation split (a few cells a class) may fit threshold and temperature unless
    ``min_images_per_class`` says otherwise, so that those paths are tested.
    """
    from cnmc.core.config import Params

    params = Params()
    train_cfg = {"epochs": 1, "batch_size": 16, "device": "cpu", "pretrained": False, **train}
    return params.model_copy(
        update={
            "split": params.split.model_copy(
                update={"min_images_per_class": min_images_per_class, "validation": "holdout"}
            ),
            "train": params.train.model_copy(update=train_cfg),
            "augment": params.augment.model_copy(update=TINY_AUGMENT),
        }
    )


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """Tiny models on a small, shared CPU: one intra-op thread is several times faster than
    two threads that wait on each other when other processes hold the cores."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _isolated_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No model hub, and MLflow never pointed at the project's own ``mlflow.db``.

    The default URI is a (lazily created) database under the test's ``tmp_path``; ``mlflow_db``
    replaces it with a copy of the session's migrated one. Whatever a test did to MLflow's
    process-wide state (an active run, ``set_tracking_uri``) is undone afterwards. MLflow is
    only touched once some test has imported it (importing it takes seconds).
    """
    # set_tracking_uri(None) also unsets MLFLOW_TRACKING_URI: forget any in-process URI first.
    _reset_mlflow()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow-default.db'}")
    for name in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID"):
        monkeypatch.delenv(name, raising=False)
    yield
    _reset_mlflow()  # then monkeypatch restores the environment


def _reset_mlflow() -> None:
    mlflow = sys.modules.get("mlflow")
    if mlflow is None:
        return
    while mlflow.active_run() is not None:
        mlflow.end_run(status="KILLED")
    mlflow.set_tracking_uri(None)


@pytest.fixture
def browser() -> str:
    """Headless Chromium's path, for the MLflow UI and patient page checks; the test skips, saying
    why, where it isn't installed."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    pytest.skip(
        "headless Chromium not installed: the browser checks need it "
        "(Debian: apt-get install chromium; .ci/run installs it before `make test`)"
    )


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny synthetic data set in the Kaggle C-NMC layout (96 px BMPs)."""
    from synthetic_cells import SyntheticConfig, write_synthetic_dataset

    data = tmp_path_factory.mktemp("tiny-data") / "data"
    write_synthetic_dataset(data, SyntheticConfig(**TINY_SYNTHETIC), seed=SEED)
    return data


@pytest.fixture(scope="session")
def tiny_store(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A prepared pipeline folder laid out like ``outputs/`` (``RunPaths(root, backbone)``
    works on it): images/{train,val,test}, data_report.json, split_report.json,
    plots/augment_preview.png. Read-only: copy it (``copy_store``) before writing into it."""
    from cnmc.core.config import AugmentConfig, SplitConfig
    from cnmc.data.augment import prepare_dataset
    from cnmc.data.manifest import build_manifest, write_manifest
    from cnmc.data.split import split_manifest, write_splits

    root = tmp_path_factory.mktemp("tiny-store") / "outputs"
    manifest = build_manifest(tiny_data, workers=1)
    write_manifest(manifest, root / "manifest.csv", root / "data_report.json")
    # The holdout split (tests/test_crossfit.py has the cross-fitted store): 3 people a class would cross-fit.
    splits = split_manifest(manifest.table, SplitConfig(validation="holdout"), seed=SEED)
    write_splits(splits, root / "splits", root / "split_report.json")
    prepare_dataset(
        root / "splits",
        root / "images",
        AugmentConfig(**TINY_AUGMENT),
        seed=SEED,
        preview_path=root / "plots" / "augment_preview.png",
        progress=False,
    )
    return root


@pytest.fixture
def copy_store(tiny_store: Path, tmp_path: Path) -> Path:
    """A writable copy of ``tiny_store`` under this test's ``tmp_path``."""
    return Path(shutil.copytree(tiny_store, tmp_path / "outputs"))


@pytest.fixture(scope="session")
def mlflow_db_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty, fully migrated MLflow SQLite store (migrations take seconds: do them once)."""
    from mlflow.tracking import MlflowClient

    folder = tmp_path_factory.mktemp("mlflow")
    path = folder / "mlflow.db"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)  # the Default experiment's ./mlruns resolves here, not in the project
        MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def mlflow_db(mlflow_db_template: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A private copy of the migrated store; ``MLFLOW_TRACKING_URI`` points at it. Returns the URI.

    The working directory becomes ``tmp_path``: MLflow resolves a new experiment's default
    artifact root (``./mlruns``) against it.
    """
    import mlflow

    copy = tmp_path / "mlflow.db"
    shutil.copyfile(mlflow_db_template, copy)
    uri = f"sqlite:///{copy}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(uri)
    return uri


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


@pytest.fixture(scope="session")
def tiny_runs(tiny_store: Path, mlflow_db_template: Path, tmp_path_factory: pytest.TempPathFactory) -> TinyRuns:
    """``tiny_runs("test_resnet")``: a finished tiny run of that backbone (trained on first use),
    all in one temporary SQLite store (``tiny_runs.tracking_uri``) under ``tiny_runs.work``."""
    return TinyRuns(tiny_store, mlflow_db_template, tmp_path_factory.mktemp("tiny-runs"))


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


@pytest.fixture(scope="session")
def champion(tiny_runs: TinyRuns) -> Champion:
    import mlflow
    from mlflow.tracking import MlflowClient

    from cnmc.core.config import PromoteConfig
    from cnmc.jobs.promote import promote

    run = tiny_runs("test_resnet")
    client = MlflowClient(tracking_uri=run.tracking_uri)
    tags = client.get_run(run.run_id).data.tags
    with pytest.MonkeyPatch.context() as mp:  # the registry store looks the logged model up globally
        mp.setenv("MLFLOW_TRACKING_URI", run.tracking_uri)
        try:
            result = promote(PromoteConfig(), tags["protocol"], tags["data_hash"], client=client)
        finally:
            mlflow.set_tracking_uri(None)
    version = client.get_model_version(result.name, result.version)
    metrics = client.get_run(result.run_id).data.metrics
    return Champion(
        run.tracking_uri,
        result.name,
        result.version,
        result.run_id,
        result.backbone,
        result.data_hash,
        float(version.tags["threshold"]),
        metrics["temperature"],
    )


# The limits of the session's `cnmc serve` (small, so that the tests of them send little).
SERVED_MAX_BATCH = 8
SERVED_MAX_BODY_MB = 8


@dataclass(frozen=True)
class Server:
    """A model server subprocess serving the champion: base URL, the champion's threshold, its log."""

    url: str
    threshold: float
    log: Path


def _run_server(command: Callable[[str, int], list[str]], champion: Champion, work: Path) -> Iterator[Server]:
    """Start ``command(model_uri, port)`` for the champion on a free port; stop it afterwards."""
    import local_server

    port = local_server.free_port()
    log = work / "server.log"
    proc = local_server.start(
        command(champion.model_uri, port), work, local_server.serving_env(champion.tracking_uri), log
    )
    try:
        url = f"http://127.0.0.1:{port}"
        local_server.wait_until_up(f"{url}/ping", proc, log)
        yield Server(url, champion.threshold, log)
    finally:
        local_server.stop(proc)


@pytest.fixture(scope="session")
def cnmc_server(champion: Champion, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """``cnmc serve`` of the champion, with small limits (``SERVED_MAX_BATCH``, ``SERVED_MAX_BODY_MB``)."""
    import local_server

    def command(model_uri: str, port: int) -> list[str]:
        return local_server.cnmc_serve(
            model_uri, port, "--max-batch", str(SERVED_MAX_BATCH), "--max-body-mb", str(SERVED_MAX_BODY_MB)
        )

    yield from _run_server(command, champion, tmp_path_factory.mktemp("cnmc-serve"))


@pytest.fixture(scope="session")
def mlflow_server(champion: Champion, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """``mlflow models serve`` of the champion (one worker), as ``make serve`` ran it before ``cnmc serve``."""
    import local_server

    yield from _run_server(local_server.mlflow_serve, champion, tmp_path_factory.mktemp("mlflow-serve"))


def metrics_document(test: dict, **fields: object) -> dict:
    """A complete metrics document around one split evaluation (``test``, also used for TTA and
    validation), as the evaluate stage writes it; ``fields`` replace top-level values."""
    import json

    from cnmc.metrics.document import Calibration

    document = {
        "backbone": "fake",
        "run_id": "r",
        "weights": "random",
        "best_epoch": 7,
        "epochs_run": 12,
        "epoch_selection": "best validation macro F1",
        "stopped_early": True,
        "train_seconds": 61.5,
        "best_val_f1_macro": 0.8,
        "protocol": "subject",
        "data_hash": "hash-subject",
        "threshold": test["threshold"],
        "test": test,
        "test_tta": test,
        "calibration": dict.fromkeys(Calibration.model_fields, 1.0),
        "validation": {
            "can_judge": True,
            "reason": "enough cells",
            "n_all": 40,
            "n_hem": 40,
            "min_images_per_class": 30,
            "at_threshold": test["at_tuned"],
        },
    } | fields
    return json.loads(json.dumps(document))  # no shared sub-dicts: a test may change one part
