"""local_server on a real child server (python -m http.server) and on one that dies."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from helpers import local_server


def test_start_wait_and_stop_a_real_server(tmp_path: Path) -> None:
    port = local_server.free_port()
    log = tmp_path / "server.log"
    command = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"]
    proc = local_server.start(command, tmp_path, os.environ, log)
    try:
        seconds = local_server.wait_until_up(f"http://127.0.0.1:{port}/", proc, log, timeout=30)
        assert 0 <= seconds < 30
        assert os.getpgid(proc.pid) == proc.pid  # its own group, so stop() reaches its children
    finally:
        local_server.stop(proc, grace=5)
    assert proc.returncode is not None


def test_a_server_that_exits_is_reported_with_its_log(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    proc = local_server.start(
        [sys.executable, "-c", "print('port in use'); raise SystemExit(3)"], tmp_path, os.environ, log
    )
    with pytest.raises(local_server.ServerDidNotStart, match=r"exited \(3\)[\s\S]*port in use"):
        local_server.wait_until_up(f"http://127.0.0.1:{local_server.free_port()}/", proc, log, timeout=30)
