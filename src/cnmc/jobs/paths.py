"""Where one backbone's training and evaluation read and write.

``cnmc train`` (the ``train@<backbone>`` stage) writes the model and ``fit.json`` (which names its
MLflow run and store); ``cnmc evaluate`` (the ``evaluate@<backbone>`` stage) reads them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cnmc.core.config import SPLITS
from cnmc.data.store import ImageStore

PIPELINE_ROOT = Path("outputs")
AD_HOC_ROOT = PIPELINE_ROOT / "runs"


def default_root() -> Path:
    """Where a training or evaluation writes: the pipeline's folder when DVC runs the stage (DVC
    sets ``DVC_STAGE``), else a folder of its own outside DVC's outs, so that an ad hoc run (or
    ``mlflow run``) leaves the pipeline's results, and ``dvc status``, as they were."""
    return PIPELINE_ROOT if os.environ.get("DVC_STAGE") else AD_HOC_ROOT


@dataclass(frozen=True)
class RunPaths:
    """Where one backbone's inputs and outputs live under a pipeline folder (``outputs/``), or
    under an ad hoc run's folder that reads the pipeline's image store (``store_root``)."""

    root: Path
    backbone: str
    store_root: Path | None = None

    @property
    def store(self) -> Path:  # the augment stage's output
        return (self.store_root or self.root) / "images"

    @property
    def model_dir(self) -> Path:  # the train stage's output: weights.pt, model.json, fit.json
        return self.root / "models" / self.backbone

    def fold_weights(self, fold: int) -> Path:  # a cross-fitted model's fold ``fold`` (the train stage's)
        return self.model_dir / f"weights_fold{fold}.pt"

    def fold_work(self, fold: int) -> Path:  # a fold's checkpoint and per-epoch weights, beside the checkpoint
        return self.checkpoint.parent / f"fold_{fold}"

    @property
    def fit_file(self) -> Path:
        return self.model_dir / "fit.json"

    @property
    def evaluation_dir(self) -> Path:  # the evaluate stage's: calibrated model.json, test predictions.csv
        return self.root / "evaluation" / self.backbone

    def familiarity_file(self, fold: int | None) -> Path:  # the evaluate stage's fit of a model's training cells
        return self.evaluation_dir / ("familiarity.npz" if fold is None else f"familiarity_fold{fold}.npz")

    @property
    def metrics(self) -> Path:  # the whole metrics document: report, promotion and the model card read it
        return self.root / "metrics" / f"{self.backbone}.json"

    @property
    def headline(self) -> Path:  # a dozen of them, in git, for `dvc exp show` and `dvc metrics diff`
        return self.root / "headline" / f"{self.backbone}.json"

    @property
    def history(self) -> Path:  # the per-epoch table behind the curves, for `dvc plots`
        return self.curves.with_name("history.csv")

    @property
    def curves(self) -> Path:  # the train stage's training curves
        return self.root / "curves" / self.backbone / "curves.png"

    @property
    def plots_dir(self) -> Path:  # the evaluate stage's PNGs, ROC CSV, confusion JSON
        return self.root / "plots" / self.backbone

    @property
    def checkpoint(self) -> Path:  # outside the DVC outs, so that a rerun of the stage can resume
        return self.root / "checkpoints" / self.backbone / "checkpoint.pt"

    @property
    def data_reports(self) -> list[Path]:
        return [
            self.root / "data_report.json",
            self.root / "split_report.json",
            self.root / "plots" / "augment_preview.png",
        ]


def open_stores(store: Path) -> dict[str, ImageStore]:
    return {split: ImageStore(store / split) for split in SPLITS}


def mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
