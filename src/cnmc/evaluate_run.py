"""The ``evaluate@<backbone>`` stage: judge a trained backbone and log it to its training run.

On validation it fits the temperature and tunes the threshold (only when validation can judge:
``split.min_images_per_class`` cells of each class, else T = 1 and 0.5, and the document, the
run's tags and the model card say why). On test it reports plain and TTA metrics, the plots, a
Grad-CAM grid and the predictions; it logs the pyfunc that serves the model and writes the
metrics document (:class:`cnmc.metrics_document.MetricsDocument`).
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import replace
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch

from cnmc import plots
from cnmc.calibration import expected_calibration_error, fit_temperature, nll
from cnmc.config import Params
from cnmc.data.store import ImageStore, StoreDataset, batch_loader
from cnmc.errors import CnmcError
from cnmc.evaluate import binary_metrics, evaluate_split, judging_shortfall, tune_threshold
from cnmc.explain import log_gradcam_grid
from cnmc.inference import Views, predict_logits, prob_all
from cnmc.metrics_document import Calibration, FitSummary, MetricsDocument, SplitEvaluation, Validation, load_document
from cnmc.model_spec import ModelSpec
from cnmc.models.backbones import create_backbone
from cnmc.runs import RunPaths, mkdir, open_stores, start_run
from cnmc.serving import log_pyfunc
from cnmc.tracking import data_hash
from cnmc.tta import tta_views

log = logging.getLogger(__name__)


def evaluate_and_log(params: Params, backbone: str, paths: RunPaths) -> MetricsDocument:
    """Evaluate ``outputs/models/<backbone>`` and log everything to the run that trained it."""
    fit, spec, model = _load_trained(paths, backbone)
    stores = open_stores(paths)
    with start_run(params, backbone, fit.run_id):
        document = _evaluate(model, spec, stores, params, paths, fit)
        document.save(paths.metrics)
        mlflow.log_metrics(document.mlflow_metrics())
        mlflow.set_tags(
            {
                "validation_can_judge": str(document.validation.can_judge).lower(),
                "validation_note": document.validation.reason,
            }
        )
        mlflow.log_artifact(str(paths.metrics))
    return document


def _load_trained(paths: RunPaths, backbone: str) -> tuple[FitSummary, ModelSpec, torch.nn.Module]:
    files = (paths.fit_file, paths.model_dir / "model.json", paths.model_dir / "weights.pt")
    if not all(f.is_file() for f in files):
        raise CnmcError(f"{paths.model_dir}: no trained model (run `cnmc train --backbone {backbone}` first)")
    fit: FitSummary = load_document(paths.fit_file, FitSummary)
    spec = ModelSpec.load(files[1])
    model = create_backbone(spec.backbone, pretrained=False).model
    model.load_state_dict(torch.load(files[2], map_location="cpu", weights_only=True))
    return fit, spec, model


def _logits(
    model: torch.nn.Module, store: ImageStore, spec: ModelSpec, batch_size: int, views: Views | None = None
) -> np.ndarray:
    loader = batch_loader(StoreDataset(store, normalize=False), batch_size=batch_size)
    return predict_logits(model, (images for images, _ in loader), spec.mean, spec.std, views=views)


def _evaluate(
    model: torch.nn.Module,
    spec: ModelSpec,
    stores: dict[str, ImageStore],
    params: Params,
    paths: RunPaths,
    fit: FitSummary,
) -> MetricsDocument:
    """Calibrate and tune on validation, evaluate on test (plain and TTA), write and log the artifacts.

    The temperature is fitted on the raw validation logits, the threshold on the calibrated
    validation probabilities; every test number is at calibrated probabilities, TTA at the same
    temperature and threshold.
    """
    val, test, batch = stores["val"], stores["test"], params.train.batch_size * 2
    val_logits = _logits(model, val, spec, batch)
    shortfall = judging_shortfall(val.targets, params.split.min_images_per_class)
    if shortfall:
        log.warning("%s: threshold 0.5 and temperature 1, nothing fitted", shortfall)
    temperature = 1.0 if shortfall else fit_temperature(val_logits, val.targets)
    val_prob = prob_all(val_logits, temperature)
    threshold = 0.5 if shortfall else tune_threshold(val.targets, val_prob)
    validation = Validation(
        can_judge=not shortfall,
        reason=shortfall or "enough cells of both classes: temperature and threshold fitted on validation",
        n_all=int(val.targets.sum()),
        n_hem=int(len(val.targets) - val.targets.sum()),
        min_images_per_class=params.split.min_images_per_class,
        at_threshold=binary_metrics(val.targets, val_prob, threshold),
    )
    spec = replace(spec, threshold=threshold, temperature=temperature)
    # One pass over the test set gives the logits of every view; view 0 is the plain image.
    test_views = _logits(model, test, spec, batch, views=tta_views)
    test_logits = test_views[:, 0]
    test_prob, tta_prob, raw_prob = (
        prob_all(test_logits, temperature),
        prob_all(test_views, temperature),
        prob_all(test_logits),
    )
    subjects = list(test.index["subject"])
    calibration = Calibration(
        temperature=temperature,
        test_ece_before=expected_calibration_error(test.targets, raw_prob),
        test_ece_after=expected_calibration_error(test.targets, test_prob),
        test_nll_before=nll(test_logits, test.targets),
        test_nll_after=nll(test_logits, test.targets, temperature),
        test_tta_ece=expected_calibration_error(test.targets, tta_prob),
        val_nll_before=nll(val_logits, val.targets),
        val_nll_after=nll(val_logits, val.targets, temperature),
    )
    _write_artifacts(model, spec, test, test_prob, tta_prob, raw_prob, paths)
    return MetricsDocument(
        **fit.model_dump(),
        protocol=params.split.protocol,
        data_hash=data_hash(),
        threshold=threshold,
        validation=validation,
        calibration=calibration,
        test=SplitEvaluation.model_validate(evaluate_split(test.targets, test_prob, subjects, threshold)),
        test_tta=SplitEvaluation.model_validate(evaluate_split(test.targets, tta_prob, subjects, threshold)),
    )


def _write_artifacts(
    model: torch.nn.Module,
    spec: ModelSpec,
    test: ImageStore,
    test_prob: np.ndarray,
    tta_prob: np.ndarray,
    raw_prob: np.ndarray,
    paths: RunPaths,
) -> None:
    """The test plots, the Grad-CAM grid, ``predictions.csv``, the calibrated ``model.json`` and the pyfunc."""
    threshold, name = spec.threshold, spec.backbone
    y_pred = (test_prob >= threshold).astype(int)
    plots_dir, out_dir = mkdir(paths.plots_dir), mkdir(paths.evaluation_dir)
    plots.confusion_matrix_png(
        test.targets, y_pred, plots_dir / "confusion.png", f"{name}: test, threshold {threshold:.2f}"
    )
    plots.confusion_matrix_json(test.targets, y_pred, plots_dir / "confusion.json")
    plots.roc_png(test.targets, test_prob, plots_dir / "roc.png", f"{name}: test ROC")
    plots.roc_csv(test.targets, test_prob, plots_dir / "roc.csv")
    plots.reliability_png(
        test.targets,
        raw_prob,
        test_prob,
        plots_dir / "reliability.png",
        f"{name}: test, temperature {spec.temperature:.3g}",
    )
    log_gradcam_grid(model, spec, test, test_prob, threshold, plots_dir / "gradcam.png")
    pd.DataFrame(
        {
            "path": test.index["path"],
            "subject": test.index["subject"],
            "label": test.index["label"],
            "prob_all": test_prob,
            "predicted": np.where(y_pred == 1, "all", "hem"),
            "prob_all_tta": tta_prob,
        }
    ).to_csv(out_dir / "predictions.csv", index=False)
    spec.save(out_dir / "model.json")
    mlflow.log_artifacts(str(plots_dir), artifact_path="plots")
    mlflow.log_artifact(str(out_dir / "predictions.csv"))
    for report in paths.data_reports:
        if report.is_file():
            mlflow.log_artifact(str(report), artifact_path="data")
    log_pyfunc(paths.model_dir / "weights.pt", out_dir / "model.json", _example_image(test))


def _example_image(store: ImageStore) -> Path:
    """A real test image file (or, if its path is gone, one written from the store) as input example."""
    path = Path(store.index["path"].iat[0])
    if path.is_file():
        return path
    from PIL import Image

    tmp = Path(tempfile.mkdtemp()) / "example.png"
    Image.fromarray(np.asarray(store.images[0])).save(tmp)
    return tmp
