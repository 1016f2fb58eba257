"""One tracked experiment in one call: the train stage, then the evaluate stage, on one MLflow run.

What ``cnmc train`` does unless told ``--no-evaluate`` (the DVC pipeline runs the stages apart),
and what the benchmarks and tests drive.
"""

from __future__ import annotations

from cnmc.core.config import Params
from cnmc.jobs.evaluate import evaluate_and_log
from cnmc.jobs.paths import RunPaths
from cnmc.jobs.train import train_backbone
from cnmc.metrics.document import MetricsDocument


def train_and_evaluate(
    params: Params,
    backbone: str,
    paths: RunPaths,
    resume: bool = False,
    weights_path: str | None = None,
    progress: bool = True,
) -> MetricsDocument:
    """Fit ``backbone`` (:mod:`cnmc.jobs.train`), then evaluate it (:mod:`cnmc.jobs.evaluate`)."""
    train_backbone(params, backbone, paths, resume=resume, weights_path=weights_path, progress=progress)
    return evaluate_and_log(params, backbone, paths)
