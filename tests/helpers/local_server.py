"""A local HTTP server (``cnmc serve``, ``mlflow models serve``, ``mlflow server``) as a child
process group: start it on a free loopback port, wait until it answers, stop it with all its workers.

The serving and UI tests and the serving benchmark drive real servers this way (the benchmark puts
``tests/`` on ``sys.path`` for it and imports ``helpers.local_server``); none of it is part of the product.
"""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

LOG_TAIL = 3000  # characters of the server log quoted when it fails
BIN = Path(sys.executable).parent


class ServerDidNotStart(RuntimeError):
    """The server exited, or did not answer in time; the message ends with its log's tail."""


# Headless Chromium for a quiet, offline page load (the UI test and docs/mlflow_screenshot.py).
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cnmc_serve(model_uri: str, port: int, *flags: str) -> list[str]:
    """The command line of ``cnmc serve`` for ``model_uri`` on 127.0.0.1:``port``."""
    return [
        sys.executable,
        "-m",
        "cnmc",
        "serve",
        "--model",
        model_uri,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *flags,
    ]


def mlflow_serve(model_uri: str, port: int) -> list[str]:
    """The command line of ``mlflow models serve`` for ``model_uri`` on 127.0.0.1:``port`` (one worker)."""
    return [
        str(BIN / "mlflow"),
        "models",
        "serve",
        "-m",
        model_uri,
        "--env-manager",
        "local",
        "--host",
        "127.0.0.1",
        "-p",
        str(port),
        "-w",
        "1",
    ]


def serving_env(tracking_uri: str | None, threads: int = 1) -> dict[str, str]:
    """The environment of a model server here: the venv's ``bin`` on ``PATH`` (``mlflow models
    serve`` starts ``uvicorn`` from it), ``threads`` torch threads, no model hub, no progress bars."""
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": str(threads),
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    }
    if tracking_uri:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    return env


def start(command: Sequence[str], cwd: Path, env: Mapping[str, str], log: Path) -> subprocess.Popen:
    """Run ``command`` in its own session (so :func:`stop` reaches its workers), output to ``log``."""
    with log.open("w") as sink:
        return subprocess.Popen(
            list(command), cwd=cwd, env=dict(env), stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )


def wait_until_up(url: str, proc: subprocess.Popen, log: Path, timeout: float = 180.0) -> float:
    """Poll ``url`` until it answers 200; return the seconds that took."""
    began = time.monotonic()
    while time.monotonic() - began < timeout:
        if proc.poll() is not None:
            raise ServerDidNotStart(f"the server exited ({proc.returncode}):\n{_tail(log)}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return time.monotonic() - began
        except OSError:  # not listening yet, or reset while starting
            pass
        time.sleep(0.25)
    raise ServerDidNotStart(f"{url} did not answer within {timeout:.0f} s:\n{_tail(log)}")


def stop(proc: subprocess.Popen, grace: float = 20.0) -> None:
    """SIGTERM the server's process group (the server and its workers); SIGKILL if it lingers."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


class Client:
    """One keep-alive HTTP connection to the loopback server."""

    def __init__(self, port: int, timeout: float = 60.0) -> None:
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)

    def post(self, body: bytes) -> tuple[int, bytes]:
        try:
            self.connection.request("POST", "/invocations", body, {"Content-Type": "application/json"})
            response = self.connection.getresponse()
            return response.status, response.read()
        except (OSError, http.client.HTTPException):
            self.connection.close()  # reconnects on the next request
            raise

    def close(self) -> None:
        self.connection.close()


@dataclass(frozen=True)
class LoadResult:
    sent: int
    wall: float  # seconds
    ms: np.ndarray  # latency of every request
    errors: list[str]  # one line per non-200 answer or failed request


def load_test(port: int, body: bytes, clients: int, requests: int, max_seconds: float = float("inf")) -> LoadResult:
    """``clients`` threads x ``requests`` sequential keep-alive requests each (stops early at
    ``max_seconds``); an answer counts as good when it is a 200 holding predictions."""
    deadline = time.monotonic() + max_seconds
    times: list[list[float]] = [[] for _ in range(clients)]
    errors: list[list[str]] = [[] for _ in range(clients)]

    def work(k: int) -> None:
        client = Client(port)
        try:
            for _ in range(requests):
                if time.monotonic() > deadline:
                    break
                start = time.perf_counter()
                try:
                    status, payload = client.post(body)
                    if status != 200 or b'"predictions"' not in payload:
                        errors[k].append(f"HTTP {status}: {payload[:200]!r}")
                except Exception as exc:  # counted, never fatal: the caller reports them
                    errors[k].append(f"{exc.__class__.__name__}: {exc}")
                times[k].append(time.perf_counter() - start)
        finally:
            client.close()

    threads = [threading.Thread(target=work, args=(k,)) for k in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    ms = np.array([t for ts in times for t in ts]) * 1000.0
    return LoadResult(len(ms), wall, ms, [e for es in errors for e in es])


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-LOG_TAIL:] if log.is_file() else f"(no log at {log})"
