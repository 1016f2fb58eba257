"""One tracked experiment in one call: the train stage, then the evaluate stage, on one MLflow run.

What ``cnmc train`` does unless told ``--no-evaluate`` (the DVC pipeline runs the stages apart),
and what the benchmarks and tests drive.
"""

from __future__ import annotations

from cnmc.config import Params
from cnmc.evaluate_run import evaluate_and_log
from cnmc.fit_run import fit_and_log
from cnmc.metrics_document import MetricsDocument
from cnmc.runs import RunPaths


def train_and_log(
    params: Params,
    backbone: str,
    paths: RunPaths,
    resume: bool = False,
    weights_path: str | None = None,
    progress: bool = True,
) -> MetricsDocument:
    """Fit ``backbone`` (:mod:`cnmc.fit_run`), then evaluate it (:mod:`cnmc.evaluate_run`)."""
    fit_and_log(params, backbone, paths, resume=resume, weights_path=weights_path, progress=progress)
    return evaluate_and_log(params, backbone, paths)
