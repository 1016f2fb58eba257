"""Where one backbone's training and evaluation read and write, and the MLflow run they share.

``cnmc train`` (the ``train@<backbone>`` stage) starts the run and fits; ``cnmc evaluate`` (the
``evaluate@<backbone>`` stage) continues the same run, found through ``fit.json``.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException

from cnmc.core.config import Params
from cnmc.core.errors import CnmcError
from cnmc.data.store import ImageStore
from cnmc.tracking.runs import data_hash, experiment_name, git_commit, run_label, tracked_run, tracking_uri

SPLITS = ("train", "val", "test")
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

    @property
    def fit_file(self) -> Path:
        return self.model_dir / "fit.json"

    @property
    def evaluation_dir(self) -> Path:  # the evaluate stage's: calibrated model.json, test predictions.csv
        return self.root / "evaluation" / self.backbone

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


def flat_params(params: Params, backbone: str) -> dict[str, Any]:
    """Every config value as ``section.key`` (MLflow params), with this run's backbone."""
    flat: dict[str, Any] = {"seed": params.seed, "data_dir": params.data_dir, "backbone": backbone}
    for section in ("split", "augment", "train"):
        for key, value in getattr(params, section).model_dump().items():
            if section == "train" and key == "backbones":
                continue
            flat[f"{section}.{key}"] = value
    return flat


def open_stores(store: Path) -> dict[str, ImageStore]:
    return {split: ImageStore(store / split) for split in SPLITS}


def store_hash(store: Path, splits: tuple[str, ...] = SPLITS) -> str:
    """Hash of the stores' index files: identifies the exact data of a run (tuning's trials see
    ``train`` and ``val`` only)."""
    digest = hashlib.sha256()
    for split in splits:
        digest.update((store / split / "index.csv").read_bytes())
    return digest.hexdigest()[:16]


def mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextmanager
def start_run(
    params: Params, backbone: str, resume_run: str | None, extra_params: dict[str, Any] | None = None
) -> Iterator[Any]:
    """A new MLflow run in the protocol's experiment (:func:`cnmc.tracking.runs.tracked_run`), tagged and
    described; with ``resume_run``, that run continued."""
    protocol, dhash = params.split.protocol, data_hash()
    mlflow.set_tracking_uri(tracking_uri())
    if resume_run:
        try:
            mlflow.tracking.MlflowClient().get_run(resume_run)
        except MlflowException:
            raise CnmcError(
                f"MLflow run {resume_run} (from training) is not in {tracking_uri()}: run `cnmc train` again"
            ) from None
    with tracked_run(
        experiment_name(protocol),
        f"{backbone}-{run_label()}-{dhash[:8]}",
        resume_run,
        log_system_metrics=True,
    ) as run:
        if not resume_run:
            mlflow.log_params(flat_params(params, backbone) | (extra_params or {}))
            mlflow.set_tags(
                {
                    "backbone": backbone,
                    "protocol": protocol,
                    "data_hash": dhash,
                    "git_commit": git_commit(),
                    "mlflow.note.content": _description(backbone, protocol, dhash),
                }
            )
        yield run


def _description(backbone: str, protocol: str, dhash: str) -> str:
    split = (
        "subject-disjoint: test = unseen subjects"
        if protocol == "subject"
        else "the paper's cell-level 90/10 split: subjects shared, optimistic"
    )
    return f"{backbone} fine-tuned on C-NMC ({split}); data {dhash[:8]}. Headline: test_f1_all, test_roc_auc."
