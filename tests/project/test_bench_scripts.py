"""The benchmark scripts start and take their flags (fast: no training here, except the GPU
check's toy-size smoke run, which CI uses to exercise every code path of that script).

Most run in this process (``_main``: the script's ``main``, with the worker's modules already
imported); the GPU check runs in its own interpreter, since it hides the GPU before torch starts
and its watchdog ends the process."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest

# Part of `make test`, not the loop: the GPU check's runs take seconds of imports apiece.
pytestmark = pytest.mark.slow

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _main(capsys: pytest.CaptureFixture[str], script: str, *args: str) -> tuple[int, str, str]:
    """Run ``bench/<script>``'s ``main`` here as ``python <script> <args>`` would: (exit code, stdout,
    stderr). What it does to the environment, ``sys.argv`` and ``sys.path`` is undone afterwards."""
    name = f"bench_script_{Path(script).stem}"
    spec = importlib.util.spec_from_file_location(name, BENCH / script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    with (
        mock.patch.dict(os.environ, {"HF_HUB_OFFLINE": "1"}),
        mock.patch.object(sys, "argv", [script, *args]),
        mock.patch.object(sys, "path", [str(BENCH), *sys.path]),
    ):
        sys.modules[name] = module  # dataclasses look their module up while being made
        try:
            spec.loader.exec_module(module)
            code = module.main(list(args)) if module.main.__code__.co_argcount else module.main()
        except SystemExit as exc:
            code = exc.code
        finally:
            del sys.modules[name]
    out = capsys.readouterr()
    return int(code or 0), out.out, out.err


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


@pytest.mark.parametrize(
    ("script", "flags"),
    [
        ("bench_gpu_train.py", ("--steps", "--warmup", "--batch-size", "--models")),
        ("bench_transfer_allidb2.py", ("--folds", "--epochs", "--image-size", "--per-class", "--seed")),
        ("bench_cnmc_real.py", ("--folds", "--variants", "--only-fold", "--epochs", "--image-size", "--summary-only")),
        ("bench_ood.py", ("--model", "--unseen", "--other")),
        # it imports the tests' server helper (tests/helpers/local_server.py) and offers both servers
        ("bench_serving.py", ("--server", "--model", "--clients", "--requests")),
        ("bench_spark_predict.py", ("--master", "--repeat", "--backbone", "--image-size")),
    ],
)
def test_bench_help_lists_its_flags(capsys: pytest.CaptureFixture[str], script: str, flags: tuple[str, ...]) -> None:
    code, out, err = _main(capsys, script, "--help")
    assert code == 0, err
    for flag in flags:
        assert flag in out


def test_real_cells_bench_skips_without_data(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out, err = _main(capsys, "bench_cnmc_real.py", "--data", str(tmp_path / "absent"), "--out", str(tmp_path))
    assert code == 0 and "skipped:" in out, err
    code, out, err = _main(capsys, "bench_cnmc_real.py", "--variants", "lite9")
    assert code == 2 and "unknown variants" in err


def test_ood_bench_skips_without_data(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    absent = str(tmp_path / "absent")
    code, _, err = _main(capsys, "bench_ood.py", "--model", absent, "--unseen", absent, "--other", absent)
    assert code == 0 and "skipped:" in err, err


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


def test_train_speed_bench_runs_a_tiny_round(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _main(
        capsys,
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
    assert code == 0, err
    assert "pipeline / best bare loop:" in out
