"""A team's set-up on a real PostgreSQL (docs/team.md): the MLflow tracking server behind MLflow's
basic-auth app, with its runs, registry and users in PostgreSQL and proxied artifacts; `cnmc train`,
`cnmc promote` and `cnmc serve` against it with a user's credentials, and refused without them;
Optuna workers sharing one study in the same PostgreSQL, and a killed worker's trial failed by the
heartbeat.

Skips, saying why, where no PostgreSQL server binary is installed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
import yaml
from helpers import local_server, postgres
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from cnmc.core.config import Params
from cnmc.serving.pyfunc import encode_file

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(postgres.missing() is not None, reason=str(postgres.missing())),
]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def cluster() -> Iterator[postgres.Cluster]:
    with postgres.cluster() as running:
        yield running


ADMIN, PASSWORD = "admin", "team-s3cret-1234"  # the basic-auth app's first user (docs/team.md)


@pytest.fixture(scope="module")
def tracking_server(cluster: postgres.Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``mlflow server --app-name basic-auth`` with its store and its users in PostgreSQL and
    artifacts proxied to a folder, as docs/team.md sets it up: its URL."""
    store, users = cluster.create_database("mlflow"), cluster.create_database("mlflow_auth")
    work, port = tmp_path_factory.mktemp("tracking-server"), local_server.free_port()
    auth = work / "basic_auth.ini"
    auth.write_text(
        "[mlflow]\ndefault_permission = READ\n"
        f"database_uri = {users}\nadmin_username = {ADMIN}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    command = [
        str(BIN / "mlflow"), "server", "--app-name", "basic-auth", "--backend-store-uri", store,
        "--artifacts-destination", (work / "artifacts").as_uri(), "--host", "127.0.0.1", "--port", str(port),
        "--workers", "1",
    ]  # fmt: skip
    env = local_server.serving_env(None) | {
        "MLFLOW_AUTH_CONFIG_PATH": str(auth),
        "MLFLOW_AUTH_ADMIN_PASSWORD": PASSWORD,
        "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-only-secret",
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = local_server.start(command, work, env, work / "server.log")
    url = f"http://127.0.0.1:{port}"
    try:
        local_server.wait_until_up(f"{url}/health", proc, work / "server.log")
        yield url
    finally:
        local_server.stop(proc)


def team_env(tracking_uri: str, credentials: bool = True) -> dict[str, str]:
    """A team member's environment: the server, and (``credentials``) their user and password."""
    env = {**local_server.serving_env(tracking_uri), "PYTHONUNBUFFERED": "1", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    if credentials:
        env |= {"MLFLOW_TRACKING_USERNAME": ADMIN, "MLFLOW_TRACKING_PASSWORD": PASSWORD}
    return env


def cnmc(*args: str, cwd: Path, tracking_uri: str, credentials: bool = True) -> subprocess.CompletedProcess[str]:
    env = team_env(tracking_uri, credentials)
    return subprocess.run(
        [sys.executable, "-m", "cnmc", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def tiny_params(path: Path, **tune: object) -> Path:
    raw = Params().model_dump()
    raw["augment"] |= {"image_size": 32, "per_class": 8, "workers": 1}
    raw["train"] |= {"pretrained": False, "device": "cpu", "batch_size": 16, "epochs": 1, "weights_dir": ""}
    raw["split"] |= {"min_images_per_class": 1}
    raw["tune"] |= {"backbone": "test_resnet", "epochs": 1, "study_name": "team", **tune}
    path.write_text(yaml.safe_dump(raw))
    return path


def test_train_promote_and_serve_through_the_tracking_server(
    tracking_server: str, tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    params = tiny_params(tmp_path / "params.yaml")
    trained = cnmc(
        "train", "--params", str(params), "--data", str(tiny_data), "--backbone", "test_resnet", "-q",
        cwd=tmp_path, tracking_uri=tracking_server,
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr[-3000:]
    refused = cnmc("promote", "--params", str(params), cwd=tmp_path, tracking_uri=tracking_server, credentials=False)
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr[-3000:]
    assert "401" in refused.stderr or "nauthorized" in refused.stderr, refused.stderr
    promoted = cnmc("promote", "--params", str(params), cwd=tmp_path, tracking_uri=tracking_server)
    assert promoted.returncode == 0, promoted.stderr[-3000:]
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", ADMIN)  # this process's client, as a team member
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    client = MlflowClient(tracking_uri=tracking_server)
    champion = client.get_model_version_by_alias("cnmc-classifier", "champion")
    assert client.get_run(champion.run_id).data.tags["backbone"] == "test_resnet"
    assert "Decision threshold" in (champion.description or "")  # the card, through the proxy too
    assert "cut to fit the registry" in (champion.description or "")  # longer than PostgreSQL's VARCHAR(5000)

    port, log = local_server.free_port(), tmp_path / "serve.log"
    server = local_server.start(
        local_server.cnmc_serve("models:/cnmc-classifier@champion", port), tmp_path,
        team_env(tracking_server), log,
    )  # fmt: skip
    try:
        local_server.wait_until_up(f"http://127.0.0.1:{port}/ping", server, log)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/info", timeout=30) as reply:
            assert json.loads(reply.read())["version"] == str(champion.version)
        cell = next(tiny_data.rglob("*.bmp"))
        body = json.dumps({"inputs": [encode_file(cell)]}).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations", body, {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=60) as reply:
            [answer] = json.loads(reply.read())["predictions"]
        assert answer["label"] in ("all", "hem") and 0 <= answer["prob_all"] <= 1
    finally:
        local_server.stop(server)


def tune_worker(params: Path, store: Path, storage: str, trials: int, cwd: Path, tracking: str) -> subprocess.Popen:
    env = team_env(tracking)
    command = [
        sys.executable, "-m", "cnmc", "tune", "--params", str(params), "-q", "--n-trials", str(trials),
        "--store", str(store), "--storage", storage, "--output", str(cwd / f"tuned-{time.monotonic_ns()}.yaml"),
    ]  # fmt: skip
    return subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def states_of(study: str, storage: str) -> dict[int, TrialState]:
    """Each trial's state by number (none before the study exists)."""
    if study not in optuna.get_all_study_names(storage):
        return {}
    return {t.number: t.state for t in optuna.load_study(study_name=study, storage=storage).trials}


def running_with_heartbeat(study: str, storage: str) -> int:
    """The study's running trials that have recorded a heartbeat (Optuna's own tables)."""
    import sqlalchemy

    query = sqlalchemy.text(
        "SELECT count(*) FROM trial_heartbeats h JOIN trials t ON t.trial_id = h.trial_id "
        "JOIN studies s ON s.study_id = t.study_id WHERE s.study_name = :study AND t.state = 'RUNNING'"
    )
    engine = sqlalchemy.create_engine(storage)
    try:
        with engine.connect() as connection:
            return connection.execute(query, {"study": study}).scalar_one()
    finally:
        engine.dispose()


def test_tuning_workers_share_one_study_and_a_killed_workers_trial_fails(
    cluster: postgres.Cluster, tracking_server: str, tiny_store: Path, tmp_path: Path
) -> None:
    storage = cluster.create_database("optuna")
    params = tiny_params(tmp_path / "params.yaml", heartbeat_s=1)
    store = tiny_store / "images"

    workers = [tune_worker(params, store, storage, 2, tmp_path, tracking_server) for _ in range(2)]
    for worker in workers:
        _, err = worker.communicate(timeout=300)
        assert worker.returncode == 0, err[-3000:]
    study = optuna.load_study(study_name="team", storage=storage)
    assert sorted(t.number for t in study.trials) == [0, 1, 2, 3]  # none lost, none twice
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in study.trials)

    # A worker killed in the middle of a trial (a study of longer trials, so that it is caught in one):
    # the next trial of any worker fails it, by the heartbeat.
    longer = tiny_params(tmp_path / "longer.yaml", heartbeat_s=1, epochs=10, study_name="team-heartbeat")
    doomed = tune_worker(longer, store, storage, 1, tmp_path, tracking_server)
    deadline = time.monotonic() + 120
    while not running_with_heartbeat("team-heartbeat", storage):  # one with no heartbeat is never failed by it
        if doomed.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"the worker never started a trial: {doomed.communicate()[1][-3000:]}")
        time.sleep(0.5)
    os.kill(doomed.pid, signal.SIGKILL)
    doomed.communicate()
    time.sleep(3)  # two heartbeats missed
    survivor = tune_worker(longer, store, storage, 1, tmp_path, tracking_server)
    _, err = survivor.communicate(timeout=300)
    assert survivor.returncode == 0, err[-3000:]
    states = states_of("team-heartbeat", storage)
    assert states == {0: TrialState.FAIL, 1: states[1]} and states[1] in (TrialState.COMPLETE, TrialState.PRUNED)
