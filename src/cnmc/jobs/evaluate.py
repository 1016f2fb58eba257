"""The ``evaluate@<backbone>`` stage: judge a trained backbone and log it to its training run.

On validation it decides, each by a rule the document, the run's tags and the model card state:
whether the 8-view TTA answer is the model's (``train.test_time_augmentation: auto``, where it raises validation ROC
AUC), the temperature (only where it lowers validation NLL with a subject-bootstrap interval above
zero) and the threshold (only where its gain in macro F1 over 0.5 has such an interval); nothing is
fitted where validation has fewer than ``split.min_images_per_class`` cells or
``split.min_subjects_per_class`` people of a class. On test it reports plain and TTA metrics, the plots, a
Grad-CAM grid and the predictions; it logs the pyfunc that serves the model and writes the
metrics document (:class:`cnmc.metrics.document.MetricsDocument`).
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import replace
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch
from sklearn.metrics import log_loss, roc_auc_score
from tqdm.auto import tqdm

from cnmc.core.atomic import atomic_write_text
from cnmc.core.config import Params
from cnmc.core.errors import CnmcError
from cnmc.data.quality import segmented_on_black
from cnmc.data.store import ImageStore, StoreDataset, batch_loader
from cnmc.inference.familiarity import FALSE_ALARM_RATE, Familiarity, ensemble_score, gated_score
from cnmc.inference.forward import Outputs, Views, predict_outputs, prob_all
from cnmc.inference.probability import BATCH_SIZE, predict_cells
from cnmc.inference.spec import ModelSpec
from cnmc.inference.tta import tta_views
from cnmc.jobs.paths import RunPaths, mkdir, open_stores
from cnmc.metrics.calibration import expected_calibration_error, nll
from cnmc.metrics.document import (
    Calibration,
    FamiliarityEvaluation,
    FitSummary,
    MetricsDocument,
    PeopleEvaluation,
    SplitEvaluation,
    Validation,
    load_document,
)
from cnmc.metrics.patients import people_evaluation
from cnmc.metrics.scores import binary_metrics, evaluate_split
from cnmc.metrics.validation_rules import choose_temperature, reported_threshold, validation_shortfall
from cnmc.models.backbones import create_backbone
from cnmc.plots import evaluation as plots
from cnmc.plots.gradcam import gradcam_examples_png
from cnmc.serving.pyfunc import ServedFiles, decode_cell, framed, gate, log_served_model
from cnmc.serving.scoring import find_images, read_image
from cnmc.tracking.provenance import data_hash
from cnmc.tracking.runs import training_run
from cnmc.training.crossfit import fold_rows
from cnmc.training.familiarity import fit_familiarity

log = logging.getLogger(__name__)
MAX_FAMILIAR_CELLS = 5000  # training cells each model's familiarity is fitted on, at most


def evaluate_and_log(params: Params, backbone: str, paths: RunPaths, ood_data: Path | None = None) -> MetricsDocument:
    """Evaluate ``outputs/models/<backbone>`` and log everything to the run that trained it; with
    ``ood_data``, a folder of cells from elsewhere, also how well the familiarity score flags them."""
    fit, spec, models = _load_trained(paths, backbone)
    stores = open_stores(Path(fit.store) if fit.store else paths.store)
    with training_run(params, backbone, fit.run_id):
        document = _evaluate(models, spec, stores, params, paths, fit, ood_data)
        document.save(paths.metrics)
        atomic_write_text(paths.headline, json.dumps(document.headline(), indent=2) + "\n")
        mlflow.log_metrics(document.mlflow_metrics())
        mlflow.set_tags(
            {
                "validation_can_judge": str(document.validation.can_judge).lower(),
                "validation_note": document.validation.reason,
            }
        )
        mlflow.log_artifact(str(paths.metrics))
    return document


def _load_trained(paths: RunPaths, backbone: str) -> tuple[FitSummary, ModelSpec, list[torch.nn.Module]]:
    """The fit, the spec and the trained models: one, or one per cross-fitting fold."""
    missing = f"{paths.model_dir}: no trained model (run `cnmc train --backbone {backbone}` first)"
    if not (paths.fit_file.is_file() and (paths.model_dir / "model.json").is_file()):
        raise CnmcError(missing)
    fit: FitSummary = load_document(paths.fit_file, FitSummary)
    spec = ModelSpec.load(paths.model_dir / "model.json")
    files = member_weights(paths, fit)
    if not all(f.is_file() for f in files):
        raise CnmcError(missing)
    models = []
    for file in files:
        model = create_backbone(spec.backbone, pretrained=False).model
        model.load_state_dict(torch.load(file, map_location="cpu", weights_only=True))
        models.append(model)
    return fit, spec, models


def member_weights(paths: RunPaths, fit: FitSummary) -> list[Path]:
    """The weights files of a trained backbone: ``weights.pt``, or one per cross-fitting fold."""
    return [paths.fold_weights(k) for k in range(fit.folds)] if fit.folds else [paths.model_dir / "weights.pt"]


def _outputs(
    model: torch.nn.Module, store: ImageStore, spec: ModelSpec, batch_size: int, views: Views | None = None
) -> Outputs:
    loader = batch_loader(StoreDataset(store, normalize=False), batch_size=batch_size)
    return predict_outputs(
        model, (images for images, _ in loader), spec.mean, spec.std, views=views, colour=spec.colour
    )


def _out_of_fold(models: list[torch.nn.Module], store: ImageStore, spec: ModelSpec, batch_size: int) -> Outputs:
    """Every view's logits of ``store``'s images and their features, each by the model that never
    saw its person: the fold's own model under cross-fitting, the one model otherwise."""
    if len(models) == 1:
        return _outputs(models[0], store, spec, batch_size, views=tta_views)
    parts = {fold: _outputs(model, store.subset(fold_rows(store, fold)), spec, batch_size, views=tta_views)
             for fold, model in enumerate(models)}  # fmt: skip
    first = parts[0]
    logits = np.empty((len(store), *first.logits.shape[1:]), dtype=np.float32)
    features = np.empty((len(store), first.features.shape[1]), dtype=np.float32)
    for fold, part in parts.items():
        rows = fold_rows(store, fold)
        logits[rows], features[rows] = part.logits, part.features
    return Outputs(logits, features)


def _fit_familiarities(
    models: list[torch.nn.Module], stores: dict[str, ImageStore], val_features: np.ndarray, spec: ModelSpec, seed: int
) -> list[Familiarity]:
    """Each model's picture of the cells it trained on, its cut-off set on the people it did not:
    its fold of validation under cross-fitting, validation under holdout. At most
    :data:`MAX_FAMILIAR_CELLS` training cells are read per model (a stored augmented set is large)."""
    train, val = stores["train"], stores["val"]
    if len(models) == 1:
        pairs = [(models[0], train, np.arange(len(val)))]
    else:
        pairs = [(model, train.subset(fold_rows(train, k, inside=False)), fold_rows(val, k))
                 for k, model in enumerate(models)]  # fmt: skip
    out = []
    for model, own, unseen_rows in pairs:
        rng = np.random.default_rng(seed)
        rows = np.sort(rng.choice(len(own), size=min(len(own), MAX_FAMILIAR_CELLS), replace=False))
        chosen = own.subset(rows)
        features = _outputs(model, chosen, spec, BATCH_SIZE).features
        segmented = float(np.mean([segmented_on_black(np.asarray(image)) for image in chosen.images]))
        out.append(fit_familiarity(features, own.targets[rows], val_features[unseen_rows], segmented))
    return out


def _evaluate(
    models: list[torch.nn.Module],
    spec: ModelSpec,
    stores: dict[str, ImageStore],
    params: Params,
    paths: RunPaths,
    fit: FitSummary,
    ood_data: Path | None = None,
) -> MetricsDocument:
    """Calibrate and tune on validation, evaluate on test (plain and TTA), write and log the artifacts.

    The temperature is fitted on the raw validation logits, the threshold on the calibrated
    validation probabilities; every test number is at calibrated probabilities, TTA at the same
    temperature and threshold. Cross-fitted (several ``models``), validation is every training
    person judged by its fold's model, and the test answer is the folds' mean P(ALL), as served.
    """
    val, test, batch = stores["val"], stores["test"], params.train.batch_size * 2
    val_outputs = _out_of_fold(models, val, spec, batch)
    val_views = val_outputs.logits
    val_subjects = val.index["subject"].to_numpy()
    val_logits = val_views[:, 0]
    shortfall = validation_shortfall(
        val.targets, val_subjects, params.split.min_images_per_class, params.split.min_subjects_per_class
    )
    if shortfall:
        log.warning("%s: threshold 0.5 and temperature 1, nothing fitted", shortfall)
    tta, tta_rule = _choose_tta(params, val.targets, val_views, shortfall)
    temperature, temperature_rule = (
        (1.0, "1: nothing fitted") if shortfall else choose_temperature(val_logits, val.targets, val_subjects)
    )
    val_prob = prob_all(val_views if tta else val_logits, temperature)
    choice = reported_threshold(val.targets, val_prob, val_subjects, shortfall)
    threshold = choice.threshold
    rules = f"threshold {choice.rule}; temperature {temperature_rule}; {tta_rule}"
    log.info("validation: %s", rules)
    validation = Validation(
        can_judge=not shortfall,
        reason=shortfall or rules,
        n_all=int(val.targets.sum()),
        n_hem=int(len(val.targets) - val.targets.sum()),
        min_images_per_class=params.split.min_images_per_class,
        at_threshold=binary_metrics(val.targets, val_prob, threshold),
        n_subjects_all=len(set(val_subjects[val.targets == 1])),
        n_subjects_hem=len(set(val_subjects[val.targets == 0])),
        threshold_rule=choice.rule,
        tuned_threshold=choice.tuned,
        threshold_gain_ci95=list(choice.gain_ci95) if choice.gain_ci95 else None,
        temperature_rule=temperature_rule,
        tta_rule=tta_rule,
    )
    spec = replace(spec, threshold=threshold, temperature=temperature, tta=tta)
    # One pass over the test set gives the logits of every view (view 0 is the plain image) and the features.
    test_outputs = [_outputs(model, test, spec, batch, views=tta_views) for model in models]
    test_views = [outputs.logits for outputs in test_outputs]
    familiarities = _fit_familiarities(models, stores, val_outputs.features, spec, params.seed)
    test_ood = gated_score(
        ensemble_score([f.score(o.features) for f, o in zip(familiarities, test_outputs, strict=True)]),
        np.array([bool(gate(image, familiarities)) for image in test.images]),
    )
    test_prob, tta_prob, raw_prob = (
        np.mean([prob_all(views[:, 0], temperature) for views in test_views], axis=0),
        np.mean([prob_all(views, temperature) for views in test_views], axis=0),
        np.mean([prob_all(views[:, 0]) for views in test_views], axis=0),
    )
    subjects = list(test.index["subject"])
    calibration = Calibration(
        temperature=temperature,
        test_ece_before=expected_calibration_error(test.targets, raw_prob),
        test_ece_after=expected_calibration_error(test.targets, test_prob),
        test_nll_before=float(log_loss(test.targets, raw_prob, labels=[0, 1])),
        test_nll_after=float(log_loss(test.targets, test_prob, labels=[0, 1])),
        test_tta_ece=expected_calibration_error(test.targets, tta_prob),
        val_nll_before=nll(val_logits, val.targets),
        val_nll_after=nll(val_logits, val.targets, temperature),
    )
    reported = tta_prob if tta else test_prob
    flagged = test_ood > 1
    kept = ~flagged
    familiarity = FamiliarityEvaluation(
        false_alarm_rate=FALSE_ALARM_RATE,
        test_cells=len(test),
        test_flagged=int(flagged.sum()),
        test_unflagged=SplitEvaluation.model_validate(
            evaluate_split(test.targets[kept], reported[kept], list(np.asarray(subjects)[kept]), threshold)
        )
        if kept.any()
        else None,
        **(_other_data(ood_data, models, familiarities, spec, test_ood) if ood_data else {}),
    )
    familiar_files = [paths.familiarity_file(k if fit.folds else None) for k in range(len(models))]
    for familiar, file in zip(familiarities, familiar_files, strict=True):
        familiar.save(mkdir(file.parent) / file.name)
    served: list[ServedFiles] = [
        (weights, paths.evaluation_dir / "model.json", file)
        for weights, file in zip(member_weights(paths, fit), familiar_files, strict=True)
    ]
    _write_artifacts(models, spec, test, test_prob, tta_prob, raw_prob, test_ood, flagged, paths, served)
    return MetricsDocument(
        familiarity=familiarity,
        **fit.model_dump(),
        protocol=params.split.protocol,
        data_hash=data_hash(),
        threshold=threshold,
        validation=validation,
        calibration=calibration,
        test=SplitEvaluation.model_validate(evaluate_split(test.targets, test_prob, subjects, threshold)),
        test_tta=SplitEvaluation.model_validate(evaluate_split(test.targets, tta_prob, subjects, threshold)),
        tta=tta,
        people=PeopleEvaluation.model_validate(
            people_evaluation(
                subjects, test.targets, reported, threshold, params.split.min_subjects_per_class, ood=flagged
            )
        ),
    )


def _other_data(
    folder: Path, models: list[torch.nn.Module], familiarities: list[Familiarity], spec: ModelSpec, test_ood: np.ndarray
) -> dict:
    """How the models' familiarity sees the cells of ``folder`` (another lab, another stain): how
    many it flags (score or quality gate), and the ROC AUC of its ``ood_score`` (the gate's floor
    included, as served) against the test cells."""
    files = find_images([str(folder)])
    if not files:
        raise CnmcError(f"{folder}: no images to judge the familiarity score on (--ood-data)")
    originals = [decode_cell(read_image(file)) for file in tqdm(files, desc="--ood-data", leave=False)]
    images = np.stack([framed(rgb, spec.framing) for rgb in originals])
    score = gated_score(
        ensemble_score(
            [
                f.score(predict_cells(m, images, spec, tta=False).features)
                for f, m in zip(familiarities, models, strict=True)
            ]
        ),
        np.array([bool(gate(rgb, familiarities)) for rgb in originals]),
    )
    flagged = score > 1
    truth = np.r_[np.zeros(len(test_ood)), np.ones(len(score))]
    return {
        "other_data": str(folder),
        "other_cells": len(files),
        "other_flagged": int(flagged.sum()),
        "other_roc_auc": float(roc_auc_score(truth, np.r_[test_ood, score])),
    }


def _choose_tta(params: Params, targets: np.ndarray, views: np.ndarray, shortfall: str) -> tuple[bool, str]:
    """Whether the 8-view TTA answer is the model's (``train.test_time_augmentation: auto``): where validation can judge
    and its ROC AUC with TTA beats the plain one."""
    if params.train.test_time_augmentation == "off":
        return False, "TTA off (train.test_time_augmentation)"
    if shortfall:
        return False, "TTA not chosen: validation cannot judge"
    plain, averaged = (binary_metrics(targets, prob_all(v))["roc_auc"] for v in (views[:, 0], views))
    verdict = "chosen" if averaged > plain else "not chosen"
    return averaged > plain, f"TTA {verdict}: validation ROC AUC {averaged:.4f} with it, {plain:.4f} without"


def _write_artifacts(
    models: list[torch.nn.Module],
    spec: ModelSpec,
    test: ImageStore,
    test_prob: np.ndarray,
    tta_prob: np.ndarray,
    raw_prob: np.ndarray,
    ood_score: np.ndarray,
    flagged: np.ndarray,
    paths: RunPaths,
    served: list[ServedFiles],
) -> None:
    """The test plots, the Grad-CAM grid (of the first model), ``predictions.csv``, the calibrated
    ``model.json`` and the pyfunc with its familiarity: one model, or the cross-fitted folds' ensemble."""
    threshold, name = spec.threshold, spec.backbone
    reported = tta_prob if spec.tta else test_prob  # the model's own answer (ModelSpec.tta)
    y_pred = (reported >= threshold).astype(int)
    plots_dir, out_dir = mkdir(paths.plots_dir), mkdir(paths.evaluation_dir)
    plots.confusion_matrix_png(
        test.targets, y_pred, plots_dir / "confusion.png", f"{name}: test, threshold {threshold:.2f}"
    )
    plots.confusion_matrix_json(test.targets, y_pred, plots_dir / "confusion.json")
    plots.roc_png(test.targets, reported, plots_dir / "roc.png", f"{name}: test ROC" + (" (TTA)" if spec.tta else ""))
    plots.roc_csv(test.targets, reported, plots_dir / "roc.csv")
    plots.reliability_png(
        test.targets,
        raw_prob,
        test_prob,
        plots_dir / "reliability.png",
        f"{name}: test, temperature {spec.temperature:.3g}",
    )
    gradcam_examples_png(models[0], spec, test, reported, threshold, plots_dir / "gradcam.png")
    pd.DataFrame(
        {
            "path": test.index["path"],
            "subject": test.index["subject"],
            "label": test.index["label"],
            "prob_all": test_prob,
            "predicted": np.where(y_pred == 1, "all", "hem"),
            "prob_all_tta": tta_prob,
            "ood_score": ood_score,
            "ood": flagged,
        }
    ).to_csv(out_dir / "predictions.csv", index=False)
    spec.save(out_dir / "model.json")
    mlflow.log_artifacts(str(plots_dir), artifact_path="plots")
    mlflow.log_artifact(str(out_dir / "predictions.csv"))
    for report in paths.data_reports:
        if report.is_file():
            mlflow.log_artifact(str(report), artifact_path="data")
    log_served_model(served, threshold, example_image(test))


def example_image(store: ImageStore) -> Path:
    """A real test image file (or, if its path is gone, one written from the store) as input example."""
    path = Path(store.index["path"].iat[0])
    if path.is_file():
        return path
    from PIL import Image

    tmp = Path(tempfile.mkdtemp()) / "example.png"
    Image.fromarray(np.asarray(store.images[0])).save(tmp)
    return tmp
