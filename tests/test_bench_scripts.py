"""The benchmark scripts start and take their flags (fast: no training here)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _run(script: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(BENCH / script), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
    )


def test_gpu_bench_skips_without_cuda() -> None:
    # Hide any GPU, so the test checks the skip path on every machine (and stays fast).
    proc = _run("bench_gpu_train.py", "--steps", "1", "--warmup", "0", env={"CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr
    assert "skipped: no CUDA device" in proc.stdout


def test_gpu_bench_help() -> None:
    proc = _run("bench_gpu_train.py", "--help")
    assert proc.returncode == 0, proc.stderr
    for flag in ("--steps", "--warmup", "--batch-size", "--models"):
        assert flag in proc.stdout


def test_transfer_bench_help() -> None:
    proc = _run("bench_transfer_allidb2.py", "--help")
    assert proc.returncode == 0, proc.stderr
    for flag in ("--folds", "--epochs", "--image-size", "--per-class", "--seed"):
        assert flag in proc.stdout


def test_real_cells_bench_help_and_skip_without_data(tmp_path: Path) -> None:
    proc = _run("bench_cnmc_real.py", "--help")
    assert proc.returncode == 0, proc.stderr
    for flag in ("--folds", "--variants", "--only-fold", "--epochs", "--image-size", "--summary-only"):
        assert flag in proc.stdout
    proc = _run("bench_cnmc_real.py", "--data", str(tmp_path / "absent"), "--out", str(tmp_path / "out"))
    assert proc.returncode == 0 and "skipped:" in proc.stdout, proc.stderr
    proc = _run("bench_cnmc_real.py", "--variants", "lite9")
    assert proc.returncode == 2 and "unknown variants" in proc.stderr


def test_serving_bench_help() -> None:
    """It imports the tests' server helper (``tests/local_server.py``) and offers both servers."""
    proc = _run("bench_serving.py", "--help")
    assert proc.returncode == 0, proc.stderr
    for flag in ("--server", "--model", "--clients", "--requests"):
        assert flag in proc.stdout
