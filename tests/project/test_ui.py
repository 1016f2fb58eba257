"""The MLflow UI (``make ui``) shows the project's runs: two real tiny runs of different backbones
in a temporary SQLite store, an ``mlflow server`` on a free 127.0.0.1 port, and headless Chromium
(Debian's ``chromium``; ``.ci/run`` installs it) rendering the experiment's runs page."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import local_server

BIN = Path(sys.executable).parent
BACKBONES = ("test_resnet", "test_efficientnet")
# Let the React app fetch and render before the DOM is dumped or the screenshot taken.
RENDER = ["--virtual-time-budget=15000", "--window-size=1600,1000"]
SERVER_START_S = 120  # mlflow server imports for a while on 2 busy cores
PAGE_RENDER_S = 90


@pytest.fixture
def mlflow_ui(browser: str, tiny_runs, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """``mlflow server`` (what ``make ui`` runs) on the tiny runs' store: its base URL."""
    port = local_server.free_port()
    log = tmp_path / "mlflow-server.log"
    env = os.environ | {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
    proc = local_server.start(
        [
            str(BIN / "mlflow"),
            "server",
            "--backend-store-uri",
            tiny_runs.tracking_uri,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        tmp_path,
        env,
        log,
    )
    request.addfinalizer(lambda: local_server.stop(proc, grace=15))
    url = f"http://127.0.0.1:{port}"
    local_server.wait_until_up(f"{url}/health", proc, log, timeout=SERVER_START_S)
    return url


def run_chromium(
    browser: str, args: list[str], profile: Path, timeout: float = PAGE_RENDER_S
) -> subprocess.CompletedProcess:
    shutil.rmtree(profile, ignore_errors=True)  # a fresh profile every time: no state carried over
    return subprocess.run(
        [browser, *local_server.CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def visible_text(html: str) -> str:
    html = re.sub(r"<(script|style)\b.*?</\1>", " ", html, flags=re.S | re.I)
    return " ".join(re.sub(r"<[^>]+>", " ", html).split())


@pytest.mark.slow
def test_mlflow_ui_lists_runs_of_both_backbones(
    browser: str, tiny_runs, mlflow_ui: str, tmp_path: Path, record_property: Callable[[str, object], None]
) -> None:
    runs = [tiny_runs(backbone) for backbone in BACKBONES]
    assert len({run.experiment_id for run in runs}) == 1
    page = f"{mlflow_ui}/#/experiments/{runs[0].experiment_id}/runs?workflowType=machine_learning"

    # The UI is a React app: --dump-dom after the page settled gives the rendered DOM. On a slow
    # machine the first try can come back before the runs request answered: try a few times.
    text = ""
    for attempt in range(3):
        result = run_chromium(browser, [*RENDER, "--dump-dom", page], tmp_path / f"profile-dom-{attempt}")
        text = visible_text(result.stdout)
        if all(run.run_name in text for run in runs):
            break
        time.sleep(2)
    assert result.returncode == 0, result.stderr[-2000:]
    for run in runs:
        assert run.run_name in text, f"run {run.run_name} not on the page; page text: {text[:1500]}"
    assert "2 matching runs" in text

    shot = tmp_path / "ui.png"
    result = run_chromium(browser, [*RENDER, f"--screenshot={shot}", page], tmp_path / "profile-shot")
    assert result.returncode == 0, result.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
    record_property("screenshot", str(shot))  # in --junitxml reports
    print(f"\nMLflow UI screenshot ({browser}): {shot}")  # shown with -s or -rP
