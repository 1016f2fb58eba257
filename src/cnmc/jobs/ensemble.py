"""``cnmc ensemble``: several evaluated backbones as one model that answers with their mean P(ALL).

Each member keeps what its own evaluation chose (temperature, colour, TTA); the ensemble's
threshold follows the same rule as a single model's
(:func:`cnmc.metrics.validation_rules.reported_threshold`): 0.5 unless a threshold tuned on the
validation split earns its place over whole people. The ensemble is judged
on the test split once, logged as its own MLflow run with a servable pyfunc
(:class:`cnmc.serving.pyfunc.EnsembleClassifier`: ``cnmc serve --model runs:/<run>/model``), and
summarised in ``<root>/ensemble/ensemble.json``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np

from cnmc.core.atomic import atomic_write_text
from cnmc.core.config import Params
from cnmc.core.errors import CnmcError
from cnmc.core.metric_catalogue import metric_names, mlflow_key
from cnmc.data.store import ImageStore
from cnmc.inference.probability import predict_proba
from cnmc.jobs.evaluate import example_image
from cnmc.jobs.paths import RunPaths, mkdir, open_stores
from cnmc.metrics.scores import binary_metrics, evaluate_split
from cnmc.metrics.validation_rules import reported_threshold, validation_shortfall
from cnmc.serving.pyfunc import Member, ServedFiles, load_member, log_ensemble
from cnmc.tracking.runs import training_run

NAME = "ensemble"


@dataclass(frozen=True)
class EnsembleSummary:
    """What ``cnmc ensemble`` built; ``str()`` is the line the CLI prints."""

    members: list[str]
    threshold: float
    rule: str
    test: dict[str, float]
    run_id: str

    def __str__(self) -> str:
        t = self.test
        return (
            f"ensemble of {', '.join(self.members)}: test ROC AUC {t['roc_auc']:.4f}, balanced accuracy "
            f"{t['balanced_accuracy']:.4f}, macro F1 {t['f1_macro']:.4f} at threshold {self.threshold:.3f} "
            f"({self.rule}); MLflow run {self.run_id}; serve it with `cnmc serve --model runs:/{self.run_id}/model`"
        )


def build_ensemble(params: Params, backbones: Sequence[str], root: Path) -> EnsembleSummary:
    """Judge the mean of ``backbones``' evaluated models on ``root``'s store and log it as one model."""
    if len(backbones) < 2:
        raise CnmcError(f"an ensemble needs at least two backbones, got {list(backbones)}")
    paths = [RunPaths(root, backbone) for backbone in backbones]
    files = [(p.model_dir / "weights.pt", p.evaluation_dir / "model.json", p.familiarity_file(None)) for p in paths]
    for backbone, path in zip(backbones, paths, strict=True):
        if path.fold_weights(0).is_file():
            raise CnmcError(
                f"{path.model_dir}: {backbone} is cross-fitted, and its served model is already the mean of its "
                "folds' models; `cnmc ensemble` combines backbones trained with split.validation=holdout"
            )
    for backbone, (weights_file, spec_file, _) in zip(backbones, files, strict=True):
        if not (weights_file.is_file() and spec_file.is_file()):
            raise CnmcError(
                f"{spec_file.parent}: no evaluated {backbone} (run `cnmc train --backbone {backbone}` first)"
            )
    served: list[ServedFiles] = [(w, s, f if f.is_file() else None) for w, s, f in files]  # older: no familiarity
    members = [load_member(*member) for member in served]
    stores = open_stores(paths[0].store)
    for member, backbone in zip(members, backbones, strict=True):
        if member.spec.image_size != stores["val"].image_size:
            raise CnmcError(
                f"{backbone} takes {member.spec.image_size} px images, the store in {root} holds other sizes"
            )
    val, test = stores["val"], stores["test"]
    val_prob, test_prob = mean_prob(members, val), mean_prob(members, test)
    val_subjects = val.index["subject"].to_numpy()
    shortfall = validation_shortfall(
        val.targets, val_subjects, params.split.min_images_per_class, params.split.min_subjects_per_class
    )
    choice = reported_threshold(val.targets, val_prob, val_subjects, shortfall)
    threshold, rule = choice.threshold, choice.rule
    evaluation = evaluate_split(test.targets, test_prob, list(test.index["subject"]), threshold)
    validation = binary_metrics(val.targets, val_prob, threshold)
    with training_run(params, NAME, None, extra_params={"members": ",".join(backbones)}) as run:
        mlflow.set_tag("threshold_rule", rule)
        mlflow.log_metrics(
            {
                mlflow_key(split, k): float(v)
                for split, values in (("test", evaluation["at_tuned"]), ("val", validation))
                for k, v in values.items()
                if k in metric_names() and math.isfinite(v)
            }
            | {"threshold": threshold}
        )
        out_dir = mkdir(root / NAME)
        summary_file = out_dir / "ensemble.json"
        atomic_write_text(
            summary_file,
            json.dumps(
                {"members": list(backbones), "threshold": threshold, "rule": rule, "validation": validation}
                | {"test": evaluation},
                indent=2,
            )
            + "\n",
        )
        mlflow.log_artifact(str(summary_file))
        log_ensemble(served, threshold, example_image(test), tta_default=False)
    return EnsembleSummary(list(backbones), threshold, rule, evaluation["at_tuned"], run.info.run_id)


def mean_prob(members: Sequence[Member], store: ImageStore) -> np.ndarray:
    """The members' mean P(ALL) for every image of a store split, each member as it answers when served."""
    images = np.array(store.images)  # a writable copy: torch refuses read-only memory
    return np.mean([predict_proba(m.model, images, m.spec) for m in members], axis=0)
