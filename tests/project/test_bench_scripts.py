"""The benchmark scripts start and take their flags (fast: no training here, except the GPU
check's toy-size smoke run, which CI uses to exercise every code path of that script)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# Each runs a script in a fresh interpreter (seconds of imports apiece): part of `make test`, not the loop.
pytestmark = pytest.mark.slow

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _run(
    script: str, *args: str, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(BENCH / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
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


def test_ood_bench_help_and_skip_without_data(tmp_path: Path) -> None:
    proc = _run("bench_ood.py", "--help")
    assert proc.returncode == 0, proc.stderr
    for flag in ("--model", "--unseen", "--other"):
        assert flag in proc.stdout
    absent = str(tmp_path / "absent")
    proc = _run("bench_ood.py", "--model", absent, "--unseen", absent, "--other", absent)
    assert proc.returncode == 0 and "skipped:" in proc.stderr, proc.stderr


def test_serving_bench_help() -> None:
    """It imports the tests' server helper (``tests/helpers/local_server.py``) and offers both servers."""
    proc = _run("bench_serving.py", "--help")
    assert proc.returncode == 0, proc.stderr
    for flag in ("--server", "--model", "--clients", "--requests"):
        assert flag in proc.stdout


# The GPU check on the CPU (any GPU hidden): the skip without --smoke, and every step at toy size with it.
NO_GPU = {"CUDA_VISIBLE_DEVICES": ""}


def test_gpu_check_skips_without_cuda(tmp_path: Path) -> None:
    out = tmp_path / "x.json"
    proc = _run("gpu_check.py", "--out", str(out), env=NO_GPU, timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("skipped: no CUDA device (")
    assert not out.exists()


def test_gpu_check_smoke_runs_every_step(tmp_path: Path) -> None:
    out = tmp_path / "x.json"
    proc = _run("gpu_check.py", "--smoke", "--out", str(out), env=NO_GPU, timeout=180)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert "GPU check on cpu | torch " in text and "| timm " in text
    assert "store: 64 train + 32 val synthetic cell images, 32 px uint8" in text
    assert "input path (Trainer's StoreDataset(normalize=False) + batch_loader" in text
    for name in ("test_resnet", "test_efficientnet"):
        assert f"  {name:<17} eager    train " in text
    assert "vs bf16 baseline" not in text  # the smoke backbones have no baseline
    assert "efficientnet_b3: not measured (baseline 1156 img/s)" in text
    assert "projected Table 2: 2 backbones x 50 epochs x (20000 train + 1100 val images)" in text
    assert f"figures: {out}" in text

    report = json.loads(out.read_text())
    assert {"machine", "settings", "store", "input_path", "training", "skipped", "baselines", "projection"} <= set(
        report
    )
    assert report["machine"]["device"] == "cpu" and report["settings"]["smoke"] is True
    assert report["input_path"]["images"] == 64 and report["input_path"]["images_per_s"] > 0
    rows = report["training"]
    assert [(r["backbone"], r["config"]) for r in rows] == [("test_resnet", "eager"), ("test_efficientnet", "eager")]
    for row in rows:
        assert row["train_images_per_s"] > 0 and row["val_images_per_s"] > 0 and row["fit_s"] > 0
        assert row["warmup_train_images"] == 48 and row["compiled"] is False
    assert set(report["projection"]["per_backbone"]) == {"test_resnet", "test_efficientnet"}
    assert report["projection"]["missing_backbones"] == [] and report["skipped"] == []
    assert set(report["baselines"]) == {"efficientnet_b3", "resnet50"}


def test_gpu_check_budget_skips_what_does_not_fit(tmp_path: Path) -> None:
    """A budget of 0 s: the store and the input path run, every configuration is skipped and said so."""
    out = tmp_path / "x.json"
    proc = _run(
        "gpu_check.py", "--smoke", "--configs", "eager,compile", "--budget-s", "0", "--out", str(out), env=NO_GPU
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("skipped (time budget: about") == 4
    report = json.loads(out.read_text())
    assert report["training"] == []
    assert [(s["backbone"], s["config"]) for s in report["skipped"]] == [
        ("test_resnet", "eager"),
        ("test_efficientnet", "eager"),
        ("test_resnet", "compile"),
        ("test_efficientnet", "compile"),
    ]
    assert report["projection"]["missing_backbones"] == ["test_resnet", "test_efficientnet"]
    assert report["projection"]["pass"] is False


def test_gpu_check_watchdog_stops_at_the_hard_limit(tmp_path: Path) -> None:
    """Past --hard-limit-s the run stops wherever it is, still printing and writing what it has.

    The limit is a twentieth of a second: a fast machine finishes the whole smoke run inside one second.
    """
    out = tmp_path / "x.json"
    proc = _run("gpu_check.py", "--smoke", "--hard-limit-s", "0.05", "--out", str(out), env=NO_GPU)
    assert proc.returncode == 0, proc.stderr
    assert "STOPPED: hard limit 0.05 s reached during" in proc.stdout
    assert json.loads(out.read_text())["stopped"].startswith("hard limit 0.05 s reached during")


def test_train_speed_bench_runs_a_tiny_round() -> None:
    proc = _run(
        "bench_train_speed.py",
        *(
            "--images",
            "8",
            "--rounds",
            "1",
            "--image-size",
            "32",
            "--batch-size",
            "4",
            "--backbone",
            "test_efficientnet",
        ),
        *("--set", "train.rotation=d4", "--set", "train.colour=centred"),
    )
    assert proc.returncode == 0, proc.stderr
    assert "pipeline / best bare loop:" in proc.stdout


def test_spark_bench_help() -> None:
    proc = _run("bench_spark_predict.py", "--help")
    assert proc.returncode == 0, proc.stderr
    for flag in ("--master", "--repeat", "--backbone", "--image-size"):
        assert flag in proc.stdout
