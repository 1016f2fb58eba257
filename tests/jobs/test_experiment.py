"""A tracked training run end to end, on tiny data and a temporary SQLite MLflow store: what
``train_and_evaluate`` logs, the served pyfunc, ``cnmc train`` on the user's own folders, and
``mlflow run``."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from helpers.params import tiny_params
from helpers.runs import TrainingCopy
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from PIL import Image

from cnmc.inference.schema import CELL_COLUMNS
from cnmc.jobs.fit_evaluate import train_and_evaluate
from cnmc.jobs.paths import RunPaths
from cnmc.serving.pyfunc import encode_file

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
BACKBONE = "test_efficientnet"
EPOCHS = 2


def tiny_params_file(path: Path, per_class: int = 8) -> Path:
    """The project's params.yaml with tiny data, augmentation and training settings."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["augment"].update(image_size=32, per_class=per_class, workers=1)
    raw["train"].update(pretrained=False, device="cpu", batch_size=16, epochs=1, weights_dir="")
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@dataclass(frozen=True)
class LoggedRun:
    uri: str
    paths: RunPaths
    document: dict
    run_id: str

    @property
    def client(self) -> MlflowClient:
        return MlflowClient(tracking_uri=self.uri)


@pytest.fixture(scope="module")
def logged_run(tiny_store: Path, mlflow_db_template: Path, tmp_path_factory: pytest.TempPathFactory) -> LoggedRun:
    """One ``train_and_evaluate`` run (2 epochs) that the tests below inspect from every side."""
    copy = TrainingCopy(tiny_store, mlflow_db_template, tmp_path_factory.mktemp("logged-run"))
    document = copy.train(tiny_params(epochs=EPOCHS), BACKBONE)
    paths = RunPaths(copy.root, BACKBONE)
    return LoggedRun(copy.tracking_uri, paths, document.model_dump(by_alias=True), document.run_id)


@pytest.fixture
def tracking(logged_run: LoggedRun, monkeypatch: pytest.MonkeyPatch) -> LoggedRun:
    """``logged_run`` with MLflow's fluent API pointed at its store."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", logged_run.uri)
    mlflow.set_tracking_uri(logged_run.uri)
    return logged_run


def artifact_files(client: MlflowClient, run_id: str, path: str = "") -> set[str]:
    out: set[str] = set()
    for item in client.list_artifacts(run_id, path):
        out |= artifact_files(client, run_id, item.path) if item.is_dir else {item.path}
    return out


# -- what a run logs --------------------------------------------------------------------------
def test_run_logs_params_tags_and_finishes(logged_run: LoggedRun) -> None:
    client = logged_run.client
    run = client.get_run(logged_run.run_id)
    experiment = client.get_experiment_by_name("cnmc-subject")
    assert experiment is not None and run.info.experiment_id == experiment.experiment_id
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["backbone"] == BACKBONE
    assert params["seed"] == "42"
    assert float(params["train.lr"]) == 1e-4
    assert float(params["augment.strength"]) == 1.0
    assert params["train.epochs"] == str(EPOCHS)
    assert params["augment.image_size"] == "32"
    assert params["weights"] == "random"
    assert "train.backbones" not in params
    tags = run.data.tags
    assert tags["backbone"] == BACKBONE and tags["protocol"] == "subject"
    assert tags["data_hash"] and tags["git_commit"]


def test_run_logs_epoch_curves_and_test_metrics(logged_run: LoggedRun) -> None:
    client, run_id, document = logged_run.client, logged_run.run_id, logged_run.document
    for name in ("train_loss", "val_loss", "val_f1_macro", "val_roc_auc"):
        assert sorted(m.step for m in client.get_metric_history(run_id, name)) == [1, 2], name
    metrics = client.get_run(run_id).data.metrics
    tuned = document["test"]["at_tuned"]
    assert metrics["test_f1_all"] == pytest.approx(tuned["f1_all"])
    assert metrics["test_roc_auc"] == pytest.approx(tuned["roc_auc"])
    assert metrics["threshold"] == pytest.approx(document["threshold"])
    assert 0.0 <= metrics["threshold"] <= 1.0
    people = document["people"]  # a call per test person, beside the cells
    test_subjects = set(pd.read_csv(logged_run.paths.store / "test" / "index.csv", dtype=str)["subject"])
    assert {p["subject"] for p in people["per_person"]} == test_subjects and people["people"] == len(test_subjects)
    assert metrics["test_people_right"] == people["right"] == sum(p["right"] for p in people["per_person"])
    assert 0.0 <= people["accuracy_ci95"][0] <= people["accuracy"] <= people["accuracy_ci95"][1] <= 1.0


def test_run_logs_artifacts_and_the_metrics_file(logged_run: LoggedRun) -> None:
    paths, document = logged_run.paths, logged_run.document
    files = artifact_files(logged_run.client, logged_run.run_id)
    expected = {
        "plots/confusion.png",
        "plots/roc.png",
        "plots/roc.csv",
        "plots/curves.png",
        "predictions.csv",
        paths.metrics.name,
        "data/data_report.json",
        "data/split_report.json",
        "data/augment_preview.png",
    }
    assert expected <= files, expected - files

    saved = json.loads(paths.metrics.read_text())
    assert saved == json.loads(json.dumps(document))  # the file is the returned document
    from cnmc.jobs.report import build_report

    report = build_report([paths.metrics], paths.root / "report-check")
    assert f"of {saved['people']['people']} people called right (exact 95% CI" in report.markdown
    assert saved["run_id"] == logged_run.run_id and saved["backbone"] == BACKBONE
    assert saved["epochs_run"] == EPOCHS and 1 <= saved["best_epoch"] <= EPOCHS
    assert {"at_0.5", "at_tuned"} <= set(saved["test"])
    for key in ("f1_all", "f1_macro", "roc_auc", "accuracy"):
        assert 0.0 <= saved["test"]["at_tuned"][key] <= 1.0
    assert saved["test"]["at_tuned"]["n"] == len(pd.read_csv(paths.store / "test" / "index.csv"))
    for name in ("weights.pt", "model.json", "fit.json"):  # the train stage's
        assert (paths.model_dir / name).is_file()
    for name in ("model.json", "predictions.csv"):  # the evaluate stage's
        assert (paths.evaluation_dir / name).is_file()
    assert paths.checkpoint.is_file()


# -- the served model ---------------------------------------------------------------------------
def test_logged_model_predicts_from_image_bytes_like_the_trainer(tracking: LoggedRun) -> None:
    logged = mlflow.search_logged_models(
        filter_string=f"source_run_id = '{tracking.run_id}'",
        output_format="list",
        experiment_ids=[tracking.client.get_run(tracking.run_id).info.experiment_id],
    )
    assert [m.name for m in logged] == ["model"]
    model = mlflow.pyfunc.load_model(f"runs:/{tracking.run_id}/model")
    # MLflow 3's own address for a logged model: models:/<model_id>.
    by_id = mlflow.pyfunc.load_model(logged[0].model_uri)

    # The trainer's test predictions, and the original files (not the stored arrays) as requests.
    expected = pd.read_csv(tracking.paths.evaluation_dir / "predictions.csv")
    assert all(p.endswith(".bmp") for p in expected["path"])
    request = pd.DataFrame({"image": [encode_file(Path(p)) for p in expected["path"]]})
    out = model.predict(request)

    assert list(out.columns) == CELL_COLUMNS
    assert len(out) == len(expected)
    assert out["prob_all"].between(0, 1).all()
    # Same probabilities: served preprocessing (decode, resize, normalise) == training's.
    np.testing.assert_allclose(out["prob_all"], expected["prob_all"], rtol=0, atol=1e-5)
    assert (out["threshold"] == tracking.document["threshold"]).all()
    assert (out["label"] == np.where(out["prob_all"] >= out["threshold"], "all", "hem")).all()
    np.testing.assert_allclose(by_id.predict(request.head(2))["prob_all"], out["prob_all"][:2], atol=1e-6)


def test_run_is_calibrated_on_validation_and_reports_tta(tracking: LoggedRun) -> None:
    from cnmc.inference.spec import ModelSpec

    document, paths = tracking.document, tracking.paths
    calibration = document["calibration"]
    assert set(calibration) >= {"temperature", "test_ece_before", "test_ece_after", "test_nll_before", "test_nll_after"}
    temperature = calibration["temperature"]
    assert temperature > 0 and all(np.isfinite(v) for v in calibration.values())
    assert calibration["val_nll_after"] <= calibration["val_nll_before"] + 1e-9  # fitted on validation
    # The served spec carries the fitted temperature and the threshold tuned after it.
    spec = ModelSpec.load(paths.evaluation_dir / "model.json")
    assert spec.temperature == temperature and spec.threshold == document["threshold"]
    tta = document["test_tta"]
    assert {"at_0.5", "at_tuned", "ci95"} <= set(tta) and tta["threshold"] == document["threshold"]
    assert tta["at_tuned"]["n"] == document["test"]["at_tuned"]["n"]

    metrics = tracking.client.get_run(tracking.run_id).data.metrics
    assert metrics["test_tta_f1_all"] == pytest.approx(tta["at_tuned"]["f1_all"])
    for name in ("temperature", "test_ece_before", "test_ece_after", "test_nll_before", "test_nll_after"):
        assert metrics[name] == pytest.approx(calibration[name]), name
    assert "plots/reliability.png" in artifact_files(tracking.client, tracking.run_id)

    # The served model with params {"tta": true} gives predictions.csv's TTA probabilities.
    expected = pd.read_csv(paths.evaluation_dir / "predictions.csv").head(4)
    model = mlflow.pyfunc.load_model(f"runs:/{tracking.run_id}/model")
    request = pd.DataFrame({"image": [encode_file(Path(p)) for p in expected["path"]]})
    out = model.predict(request, params={"tta": True})
    assert list(out.columns) == CELL_COLUMNS
    np.testing.assert_allclose(out["prob_all"], expected["prob_all_tta"], rtol=0, atol=1e-5)


def test_the_logged_model_bundles_only_the_code_and_packages_inference_needs(
    tracking: LoggedRun, tmp_path: Path
) -> None:
    from cnmc.core.imports import PACKAGE_DIR, code_closure
    from cnmc.serving.model_env import ENTRY, requirements

    local = Path(mlflow.artifacts.download_artifacts(f"runs:/{tracking.run_id}/model", dst_path=str(tmp_path)))
    code = local / "code" / "cnmc"
    bundled = {p.relative_to(code).as_posix() for p in code.rglob("*") if p.is_file()}
    assert bundled == {p.relative_to(PACKAGE_DIR).as_posix() for p in code_closure(ENTRY)[0]}
    listed = (local / "requirements.txt").read_text().split()
    assert set(requirements()) <= set(listed) and not any(r.startswith(("dvc", "optuna")) for r in listed)


def test_a_validation_set_too_small_fits_nothing_and_says_so(
    tiny_store: Path, mlflow_db: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cnmc.jobs.model_card import threshold_note
    from cnmc.metrics.document import MetricsDocument

    root = Path(shutil.copytree(tiny_store, tmp_path / "outputs"))
    monkeypatch.chdir(tmp_path)
    document = train_and_evaluate(
        tiny_params(min_images_per_class=30), BACKBONE, RunPaths(root, BACKBONE), progress=False
    ).model_dump(by_alias=True)
    validation = document["validation"]
    assert validation["can_judge"] is False and validation["min_images_per_class"] == 30
    assert "fewer than split.min_images_per_class = 30 of each" in validation["reason"]
    assert document["threshold"] == 0.5 and document["calibration"]["temperature"] == 1.0
    assert document["epoch_selection"].startswith("last epoch")
    run = MlflowClient(tracking_uri=mlflow_db).get_run(document["run_id"])
    assert run.data.tags["validation_can_judge"] == "false" and run.data.metrics["threshold"] == 0.5
    assert "final_val_f1_macro" in run.data.metrics
    note = threshold_note(MetricsDocument.model_validate(document))
    assert note.startswith("Validation: holdout validation")
    assert "**Nothing was fitted on validation** (validation holds" in note


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("%%% not base64 %%%", "not valid base64"),
        (base64.b64encode(b"just some text, no image").decode(), "not an image"),
    ],
)
def test_logged_model_refuses_bad_input_with_a_clear_message(tracking: LoggedRun, value: str, message: str) -> None:
    model = mlflow.pyfunc.load_model(f"runs:/{tracking.run_id}/model")
    with pytest.raises(MlflowException, match=message) as info:
        model.predict(pd.DataFrame({"image": [value]}))
    assert "row 0" in str(info.value)
    assert info.value.error_code == "INVALID_PARAMETER_VALUE"


# -- the command line ----------------------------------------------------------------------------
def write_class_folders(root: Path, prefix: str, per_class: int, seed: int) -> Path:
    """``root/all`` and ``root/hem`` with small random PNGs (distinct names: distinct subjects)."""
    rng = np.random.default_rng(seed)
    for label in ("all", "hem"):
        (root / label).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, size=(40, 40, 3), dtype=np.uint8)
            pixels[10:30, 10:30] = (200, 60, 160) if label == "all" else (90, 60, 200)
            Image.fromarray(pixels).save(root / label / f"{prefix}_{label}_{i}.png")
    return root


def test_cnmc_train_on_own_folders_end_to_end(tmp_path: Path, mlflow_db: str) -> None:
    from cnmc.cli import main

    write_class_folders(tmp_path / "mine", "train", per_class=4, seed=1)
    write_class_folders(tmp_path / "mine_test", "test", per_class=2, seed=2)
    params = tiny_params_file(tmp_path / "params.yaml")
    code = main(
        [
            "train",
            "--params",
            str(params),
            "--data",
            "mine",
            "--test-data",
            "mine_test",
            "--backbone",
            "test_resnet",
            "--no-pretrained",
            "--epochs",
            "1",
            "--metrics-out",
            "m.json",
            "--quiet",
        ]
    )
    assert code == 0

    document = json.loads((tmp_path / "m.json").read_text())
    assert document["backbone"] == "test_resnet" and document["epochs_run"] == 1
    assert document["test"]["at_tuned"]["n"] == 4  # exactly the separate test folder
    work = RunPaths(tmp_path / "outputs" / "direct", "test_resnet")
    assert json.loads(work.metrics.read_text()) == document
    run = MlflowClient(tracking_uri=mlflow_db).get_run(document["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["backbone"] == "test_resnet"
    assert run.data.params["train.pretrained"] == "False"


@pytest.mark.slow
def test_mlflow_run_trains_end_to_end(tmp_path: Path, tiny_data: Path, mlflow_db: str) -> None:
    project = tmp_path / "project"
    project.mkdir()
    for name in ("MLproject", "conda.yaml"):
        shutil.copy(ROOT / name, project / name)
    tiny_params_file(project / "params.yaml")
    shutil.copytree(tiny_data, project / "data")
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "MLFLOW_TRACKING_URI": mlflow_db,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
    }
    proc = subprocess.run(
        [
            str(BIN / "mlflow"),
            "run",
            ".",
            "--env-manager",
            "local",
            "-P",
            "backbone=test_resnet",
            "-P",
            "epochs=1",
            "--experiment-name",
            "cnmc-subject",
        ],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"mlflow run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"

    # One job, one run: the launcher's own, where promotion looks (as the README launches it), and
    # the run id mlflow prints is the one that holds the work. Files go to the ad hoc folder, not DVC's outs.
    client = MlflowClient(tracking_uri=mlflow_db)
    experiment = client.get_experiment_by_name("cnmc-subject")
    assert experiment is not None
    # The tiny data's people are cross-fitted (the demo profile's folds): the job's run, its fold runs under it.
    runs = client.search_runs([experiment.experiment_id])
    (run,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    folds = sorted(r.data.tags["cnmc.fold"] for r in runs if r.data.tags.get("mlflow.parentRunId") == run.info.run_id)
    assert len(folds) >= 2 and folds == [str(k) for k in range(len(folds))] and len(runs) == 1 + len(folds)
    assert not client.search_runs(["0"])
    assert f"Run (ID '{run.info.run_id}') succeeded" in proc.stderr + proc.stdout
    assert run.info.status == "FINISHED"
    assert run.data.params["backbone"] == "test_resnet"
    assert run.data.params["train.epochs"] == "1"
    assert run.data.tags["cnmc.kind"] == "mlflow-run" and run.info.run_name.startswith("test_resnet-mlflow-run-")
    assert "test_f1_all" in run.data.metrics
    assert (project / "outputs/runs/metrics/test_resnet.json").is_file()
    assert not (project / "outputs/models").exists() and not (project / "outputs/metrics").exists()


def test_interrupted_run_is_killed_then_resumed_into_the_same_run(
    copy_store: Path, mlflow_db: str, monkeypatch: pytest.MonkeyPatch, logged_run: LoggedRun
) -> None:
    from cnmc.core.errors import CnmcError
    from cnmc.training.trainer import Trainer

    paths = RunPaths(copy_store, BACKBONE)
    real_epoch = Trainer.train_epoch

    def interrupted_in_epoch_2(self: Trainer, epoch: int) -> float:
        if epoch == 1:
            raise KeyboardInterrupt
        return real_epoch(self, epoch)

    monkeypatch.setattr(Trainer, "train_epoch", interrupted_in_epoch_2)
    with pytest.raises(CnmcError, match="--resume"):
        train_and_evaluate(tiny_params(epochs=EPOCHS), BACKBONE, paths, progress=False)
    client = MlflowClient(tracking_uri=mlflow_db)
    (run,) = client.search_runs([client.get_experiment_by_name("cnmc-subject").experiment_id])
    assert run.info.status == "KILLED"
    assert mlflow.active_run() is None

    monkeypatch.setattr(Trainer, "train_epoch", real_epoch)
    document = train_and_evaluate(tiny_params(epochs=EPOCHS), BACKBONE, paths, resume=True, progress=False).model_dump(
        by_alias=True
    )
    assert document["run_id"] == run.info.run_id and document["epochs_run"] == EPOCHS
    assert client.get_run(run.info.run_id).info.status == "FINISHED"
    for name in ("train_loss", "val_f1_macro"):  # epoch 1 not logged twice
        assert [m.step for m in client.get_metric_history(run.info.run_id, name)] == [1, 2]
    # Same seed, settings and data as ``logged_run``: the very same model, even across the resume.
    weights = torch.load(paths.model_dir / "weights.pt", weights_only=True)
    reference = torch.load(logged_run.paths.model_dir / "weights.pt", weights_only=True)
    assert all(torch.equal(weights[k], reference[k]) for k in reference)
    assert document["test"] == logged_run.document["test"]
