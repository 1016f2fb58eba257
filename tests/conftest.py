"""Shared fixtures: a tiny prepared image store (made once per session through the real
pipeline functions), a temporary SQLite MLflow store (migrated once, copied per test), tiny tracked
runs, and the champion among them served by ``cnmc serve`` and ``mlflow models serve`` (each started
once a session, when a test first asks for it). What the fixtures return, and everything else the
tests share, is defined in ``tests/helpers/``."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import local_server
from helpers.params import SEED, TINY_AUGMENT, TINY_SYNTHETIC
from helpers.runs import Champion, TinyRuns, reset_mlflow
from helpers.servers import SERVED_MAX_BATCH, SERVED_MAX_BODY_MB, Server, run_server


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Longest first: the slow whole-project runs (the DVC pipeline, the team set-up: minutes each),
    then the other slow tests, then the rest. The two workers start on the long ones and run out of
    work together, instead of one starting the DVC pipeline as the other runs out."""

    def rank(item: pytest.Item) -> int:
        if item.get_closest_marker("slow") is None:
            return 2
        return 0 if "project" in item.path.parts else 1

    items.sort(key=rank)


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
    reset_mlflow()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow-default.db'}")
    for name in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID"):
        monkeypatch.delenv(name, raising=False)
    yield
    reset_mlflow()  # then monkeypatch restores the environment


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
    from helpers.synthetic_cells import SyntheticConfig, write_synthetic_dataset

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
    # The holdout split (tests/training/test_crossfit.py has the cross-fitted store): 3 people a class would cross-fit.
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


@pytest.fixture(scope="session")
def tiny_runs(tiny_store: Path, mlflow_db_template: Path, tmp_path_factory: pytest.TempPathFactory) -> TinyRuns:
    """``tiny_runs("test_resnet")``: a finished tiny run of that backbone (trained on first use),
    all in one temporary SQLite store (``tiny_runs.tracking_uri``) under ``tiny_runs.work``."""
    return TinyRuns(tiny_store, mlflow_db_template, tmp_path_factory.mktemp("tiny-runs"))


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


@pytest.fixture(scope="session")
def cnmc_server(champion: Champion, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """``cnmc serve`` of the champion, with small limits (``SERVED_MAX_BATCH``, ``SERVED_MAX_BODY_MB``)."""

    def command(model_uri: str, port: int) -> list[str]:
        return local_server.cnmc_serve(
            model_uri, port, "--max-batch", str(SERVED_MAX_BATCH), "--max-body-mb", str(SERVED_MAX_BODY_MB)
        )

    yield from run_server(command, champion, tmp_path_factory.mktemp("cnmc-serve"))


@pytest.fixture(scope="session")
def mlflow_server(champion: Champion, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """``mlflow models serve`` of the champion (one worker), as ``make serve`` ran it before ``cnmc serve``."""
    yield from run_server(local_server.mlflow_serve, champion, tmp_path_factory.mktemp("mlflow-serve"))
