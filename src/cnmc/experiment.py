"""One tracked training run: train a backbone on the image store, evaluate it on the test
split with a threshold tuned on validation, and log everything to MLflow.

Used by ``cnmc train`` (the DVC ``train@<backbone>`` stages and ``mlflow run``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch

from cnmc import plots
from cnmc.atomic import atomic_write_text
from cnmc.calibration import expected_calibration_error, fit_temperature, nll, prob_all
from cnmc.config import Params
from cnmc.data.store import ImageStore, StoreDataset
from cnmc.errors import CnmcError
from cnmc.evaluate import binary_metrics, evaluate_split, judging_shortfall, tune_threshold
from cnmc.explain import log_gradcam_grid
from cnmc.metric_names import mlflow_key
from cnmc.models.backbones import create_backbone
from cnmc.serving import ModelSpec, log_pyfunc
from cnmc.tracking import data_hash, experiment_name, git_commit, tracking_uri
from cnmc.train import Trainer, config_fingerprint

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunPaths:
    """Where one backbone's inputs and outputs live under a pipeline folder (``outputs/``)."""

    root: Path
    backbone: str

    @property
    def store(self) -> Path:  # the augment stage's output
        return self.root / "images"

    @property
    def model_dir(self) -> Path:  # weights.pt, model.json, test predictions.csv
        return self.root / "models" / self.backbone

    @property
    def metrics(self) -> Path:  # for `dvc metrics show`
        return self.root / "metrics" / f"{self.backbone}.json"

    @property
    def plots_dir(self) -> Path:  # PNGs, ROC CSV, confusion JSON
        return self.root / "plots" / self.backbone

    @property
    def checkpoint(self) -> Path:  # outside the DVC outs, so that a rerun of the stage can resume
        return self.root / "checkpoints" / self.backbone / "checkpoint.pt"

    @property
    def data_reports(self) -> list[Path]:
        return [self.root / "data_report.json", self.root / "split_report.json",
                self.root / "plots" / "augment_preview.png"]


def flat_params(params: Params, backbone: str) -> dict[str, Any]:
    """Every config value as ``section.key`` (MLflow params), with this run's backbone."""
    flat: dict[str, Any] = {"seed": params.seed, "data_dir": params.data_dir, "backbone": backbone}
    for section in ("split", "augment", "train"):
        for key, value in getattr(params, section).model_dump().items():
            if section == "train" and key == "backbones":
                continue
            flat[f"{section}.{key}"] = value
    return flat


def store_hash(store: Path) -> str:
    """Hash of the stores' index files: identifies the exact training data of a run."""
    digest = hashlib.sha256()
    for split in ("train", "val", "test"):
        digest.update((store / split / "index.csv").read_bytes())
    return digest.hexdigest()[:16]


def train_and_log(params: Params, backbone: str, paths: RunPaths, resume: bool = False,
                  weights_path: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Train ``backbone``, evaluate it, log the run to MLflow; return the metrics document."""
    stores = _open_stores(paths)
    weights_path = weights_path or _weights_in_dir(params.train.weights_dir, backbone)
    # Seed before building: a random-init model (or the new head of a pretrained one) draws its
    # starting weights here, so the same seed, settings and data give the same run.
    torch.manual_seed(params.seed)
    net = create_backbone(backbone, pretrained=params.train.pretrained, weights_path=weights_path)
    fingerprint = config_fingerprint({"params": flat_params(params, backbone), "store": store_hash(paths.store)})
    trainer = Trainer(net.model, net.mean, net.std, stores["train"], stores["val"], params.train,
                      params.seed, paths.checkpoint, fingerprint, params.split.min_images_per_class,
                      progress=progress)

    run_id_file = paths.checkpoint.with_name("mlflow_run_id")
    resume_run = run_id_file.read_text().strip() if resume and run_id_file.is_file() else None
    with _start_run(params, backbone, resume_run, extra_params={"weights": net.weights}) as run:
        paths.checkpoint.parent.mkdir(parents=True, exist_ok=True)
        run_id_file.write_text(run.info.run_id)
        logged_epochs = _logged_epochs(run.info.run_id)

        def on_epoch(row: dict[str, float]) -> None:
            if int(row["epoch"]) not in logged_epochs:
                mlflow.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=int(row["epoch"]))

        try:
            fit = trainer.fit(resume=resume, on_epoch=on_epoch)
        except KeyboardInterrupt:
            mlflow.end_run(status="KILLED")
            raise CnmcError(f"interrupted: the last epoch's checkpoint is in {paths.checkpoint}; "
                            "rerun with --resume to continue") from None
        plots.training_curves_png(fit.history, _mkdir(paths.plots_dir) / "curves.png")
        document = _evaluate_and_log(trainer, stores, ModelSpec(
            backbone, stores["train"].image_size, tuple(net.mean), tuple(net.std), threshold=0.5), params, paths)
        document |= {"best_epoch": fit.best_epoch, "epochs_run": len(fit.history), "epoch_selection": fit.selection,
                     "stopped_early": fit.stopped_early, "train_seconds": round(fit.seconds, 1),
                     "best_val_f1_macro": fit.best_val_f1_macro, "run_id": run.info.run_id}
        atomic_write_text(paths.metrics, json.dumps(document, indent=2) + "\n")
        mlflow.log_artifact(str(paths.metrics))
    return document


def evaluate_saved(params: Params, backbone: str, paths: RunPaths, progress: bool = True) -> dict[str, Any]:
    """Re-evaluate a trained backbone's saved weights on the current splits, as a new MLflow run."""
    spec_path, weights = paths.model_dir / "model.json", paths.model_dir / "weights.pt"
    if not spec_path.is_file() or not weights.is_file():
        raise CnmcError(f"{paths.model_dir}: no trained model (run `cnmc train --backbone {backbone}` first)")
    stores = _open_stores(paths)
    spec = ModelSpec.load(spec_path)
    net = create_backbone(spec.backbone, pretrained=False)
    net.model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    trainer = Trainer(net.model, spec.mean, spec.std, stores["train"], stores["val"], params.train,
                      params.seed, paths.checkpoint, "", params.split.min_images_per_class, progress=progress)
    with _start_run(params, backbone, None, run_name_suffix="-evaluate") as run:
        document = _evaluate_and_log(trainer, stores, spec, params, paths)
        document["run_id"] = run.info.run_id
    return document


@contextmanager
def _start_run(params: Params, backbone: str, resume_run: str | None, extra_params: dict | None = None,
               run_name_suffix: str = "") -> Iterator[Any]:
    """An MLflow run in the protocol's experiment (or the one `mlflow run` chose), tagged and described."""
    protocol, dhash = params.split.protocol, data_hash()
    mlflow.set_tracking_uri(tracking_uri())
    if not os.environ.get("MLFLOW_RUN_ID") and not resume_run:
        mlflow.set_experiment(experiment_name(protocol))  # under `mlflow run`, the CLI picked it
    with mlflow.start_run(run_id=resume_run, run_name=f"{backbone}-{protocol}-{dhash[:8]}{run_name_suffix}",
                          log_system_metrics=True) as run:
        if not resume_run:
            mlflow.log_params(flat_params(params, backbone) | (extra_params or {}))
            mlflow.set_tags({"backbone": backbone, "protocol": protocol, "data_hash": dhash,
                             "git_commit": git_commit(),
                             "mlflow.note.content": _description(backbone, protocol, dhash)})
        yield run


def _evaluate_and_log(trainer: Trainer, stores: dict[str, ImageStore], spec: ModelSpec, params: Params,
                      paths: RunPaths) -> dict[str, Any]:
    """Calibrate and tune the threshold on validation, evaluate on test (plain and with TTA),
    save and log artifacts and the pyfunc.

    Only a validation set with ``split.min_images_per_class`` cells of each class may fit the
    temperature and the threshold; otherwise T = 1 and 0.5, and the document, the run's tags and
    the model card say why (``validation``). The temperature is fitted on the raw validation
    logits, the threshold is tuned on the calibrated validation probabilities, and every test
    number (``test``, ``predictions.csv``, the served model) is at calibrated probabilities.
    ``test_tta`` is the same evaluation with the probabilities averaged over the 8 D4 views, at
    the same temperature and threshold.
    """
    val, test = stores["val"], stores["test"]
    val_logits, _ = trainer.predict_logits(StoreDataset(val, spec.mean, spec.std))
    shortfall = judging_shortfall(val.targets, params.split.min_images_per_class)
    if shortfall:
        log.warning("%s: threshold 0.5 and temperature 1, nothing fitted", shortfall)
    temperature = 1.0 if shortfall else fit_temperature(val_logits, val.targets)
    val_prob = prob_all(val_logits, temperature)
    threshold = 0.5 if shortfall else tune_threshold(val.targets, val_prob)
    validation = {"can_judge": not shortfall, "reason": shortfall or "enough cells of both classes: "
                  "temperature and threshold fitted on validation", "n_all": int(val.targets.sum()),
                  "n_hem": int(len(val.targets) - val.targets.sum()),
                  "min_images_per_class": params.split.min_images_per_class,
                  "at_threshold": binary_metrics(val.targets, val_prob, threshold)}
    spec = replace(spec, threshold=threshold, temperature=temperature)
    # One pass over the test set gives the logits of every view; view 0 is the plain image.
    test_views, _ = trainer.predict_logits(StoreDataset(test, spec.mean, spec.std), tta=True)
    test_logits = test_views[:, 0]
    test_prob, tta_prob = prob_all(test_logits, temperature), prob_all(test_views, temperature)
    subjects = list(test.index["subject"])
    result = evaluate_split(test.targets, test_prob, subjects, threshold)
    tta_result = evaluate_split(test.targets, tta_prob, subjects, threshold)
    raw_prob = prob_all(test_logits)
    calibration = {
        "temperature": temperature,
        "test_ece_before": expected_calibration_error(test.targets, raw_prob),
        "test_ece_after": expected_calibration_error(test.targets, test_prob),
        "test_nll_before": nll(test_logits, test.targets),
        "test_nll_after": nll(test_logits, test.targets, temperature),
        "test_tta_ece": expected_calibration_error(test.targets, tta_prob),
        "val_nll_before": nll(val_logits, val.targets),
        "val_nll_after": nll(val_logits, val.targets, temperature),
    }

    y_pred = (test_prob >= threshold).astype(int)
    plots_dir, model_dir, name = _mkdir(paths.plots_dir), _mkdir(paths.model_dir), spec.backbone
    plots.confusion_matrix_png(test.targets, y_pred, plots_dir / "confusion.png",
                               f"{name}: test, threshold {threshold:.2f}")
    plots.confusion_matrix_json(test.targets, y_pred, plots_dir / "confusion.json")
    plots.roc_png(test.targets, test_prob, plots_dir / "roc.png", f"{name}: test ROC")
    plots.roc_csv(test.targets, test_prob, plots_dir / "roc.csv")
    plots.reliability_png(test.targets, raw_prob, test_prob, plots_dir / "reliability.png",
                          f"{name}: test, temperature {temperature:.3g}")
    pd.DataFrame({
        "path": test.index["path"], "subject": test.index["subject"], "label": test.index["label"],
        "prob_all": test_prob, "predicted": np.where(y_pred == 1, "all", "hem"), "prob_all_tta": tta_prob,
    }).to_csv(model_dir / "predictions.csv", index=False)
    torch.save(trainer.model.state_dict(), model_dir / "weights.pt")
    spec.save(model_dir / "model.json")

    log_gradcam_grid(trainer.model, spec, test, test_prob, threshold, plots_dir / "gradcam.png")
    mlflow.log_artifacts(str(plots_dir), artifact_path="plots")
    mlflow.log_artifact(str(model_dir / "predictions.csv"))
    for report in paths.data_reports:
        if report.is_file():
            mlflow.log_artifact(str(report), artifact_path="data")
    log_pyfunc(model_dir, _example_image(test))
    # Headline metrics at the validation-tuned threshold; the paper's argmax rule (0.5) beside them.
    mlflow.log_metrics({f"test_{k}": v for k, v in result["at_tuned"].items() if isinstance(v, float)})
    mlflow.log_metrics({f"test_t0.5_{k}": v for k, v in result["at_0.5"].items() if isinstance(v, float)})
    mlflow.log_metrics({f"test_tta_{k}": v for k, v in tta_result["at_tuned"].items() if isinstance(v, float)})
    mlflow.log_metrics(calibration)
    mlflow.log_metric("threshold", threshold)
    # The selected model on validation at the same threshold: what promotion ranks runs by.
    mlflow.log_metrics({mlflow_key("val", k): v for k, v in validation["at_threshold"].items()
                        if isinstance(v, float)})
    mlflow.set_tags({"validation_can_judge": str(not shortfall).lower(), "validation_note": validation["reason"]})
    return {"backbone": name, "protocol": params.split.protocol, "data_hash": data_hash(),
            "threshold": threshold, "validation": validation, "test": result, "test_tta": tta_result,
            "calibration": calibration}


def _open_stores(paths: RunPaths) -> dict[str, ImageStore]:
    return {split: ImageStore(paths.store / split) for split in ("train", "val", "test")}


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _example_image(store: ImageStore) -> Path:
    """A real test image file (or, if its path is gone, one written from the store) as input example."""
    path = Path(store.index["path"].iat[0])
    if path.is_file():
        return path
    from PIL import Image

    tmp = Path(tempfile.mkdtemp()) / "example.png"
    Image.fromarray(np.asarray(store.images[0])).save(tmp)
    return tmp


def _weights_in_dir(weights_dir: str, backbone: str) -> str | None:
    if not weights_dir:
        return None
    for suffix in (".safetensors", ".pth", ".pt", ".bin"):
        candidate = Path(weights_dir) / f"{backbone}{suffix}"
        if candidate.is_file():
            return str(candidate)
    return None


def _logged_epochs(run_id: str) -> set[int]:
    history = mlflow.tracking.MlflowClient().get_metric_history(run_id, "val_f1_macro")
    return {m.step for m in history}


def _description(backbone: str, protocol: str, dhash: str) -> str:
    split = ("subject-disjoint: test = unseen subjects" if protocol == "subject"
             else "the paper's cell-level 90/10 split: subjects shared, optimistic")
    return f"{backbone} fine-tuned on C-NMC ({split}); data {dhash[:8]}. Headline: test_f1_all, test_roc_auc."
