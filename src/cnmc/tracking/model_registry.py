"""Promotion: register the best tracked run of the current data and protocol as a version of
the registered model, point the ``challenger`` alias at it, and, in a release, move the
``champion`` alias to it when it beats the current champion.

A release is deliberate: ``cnmc promote`` releases; the DVC ``promote`` stage (``--from-pipeline``)
releases only where ``promote.pipeline_releases`` allows it and never inside ``dvc exp run`` (DVC
names the experiment in ``DVC_EXP_NAME``), so an experiment only ever moves ``challenger``. Only
comparable runs compete: same split protocol, same data hash (``data.dvc``), tracked in the
protocol's experiment ``cnmc-<protocol>``, finished, with the ranking metric and a logged model.
Runs are ranked on validation by default (``promote.rank_on``), so that the champion's test
figures are not the largest of several test figures: test stays a report, not a selection set.
Every version carries its metrics, protocol, data hash and run id as tags, so the champion
can be compared without its run.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, replace
from typing import Any

from mlflow.entities import LoggedModel, LoggedModelStatus, Run, ViewType
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import (
    ALREADY_EXISTS,
    INVALID_PARAMETER_VALUE,
    RESOURCE_ALREADY_EXISTS,
    RESOURCE_DOES_NOT_EXIST,
    ErrorCode,
)
from mlflow.tracking import MlflowClient

from cnmc.core.config import PromoteConfig
from cnmc.core.errors import CnmcError
from cnmc.core.metric_catalogue import MLFLOW_PREFIX, mlflow_key
from cnmc.tracking.promotion import PromotionResult
from cnmc.tracking.provenance import experiment_name, shown_uri, tracking_uri
from cnmc.tracking.version_check import version_problem

log = logging.getLogger(__name__)

MODEL_NAME = "model"  # the name the training run logs its pyfunc under
_NOT_FOUND = {ErrorCode.Name(RESOURCE_DOES_NOT_EXIST), ErrorCode.Name(INVALID_PARAMETER_VALUE)}
_EXISTS = {ErrorCode.Name(RESOURCE_ALREADY_EXISTS), ErrorCode.Name(ALREADY_EXISTS)}


@dataclass(frozen=True)
class _Candidate:
    run: Run
    model: LoggedModel
    value: float
    tie: float

    @property
    def key(self) -> tuple[float, float, int]:
        return (self.value, self.tie, self.run.info.start_time or 0)


def register_best(
    cfg: PromoteConfig, protocol: str, data_hash: str, client: MlflowClient | None = None, release: bool = True
) -> PromotionResult:
    """Register the best run of ``protocol`` on ``data_hash``, point ``cfg.candidate_alias`` at it,
    and with ``release`` move ``cfg.alias`` to it if it beats the current holder on the same data.
    The model card is the promote job's (:mod:`cnmc.jobs.promote`)."""
    client = client or MlflowClient(tracking_uri=tracking_uri())
    best = _best_candidate(client, cfg, protocol, data_hash)
    run = best.run
    version = _registered_version(client, cfg.model_name, best, protocol, data_hash)
    problem = version_problem(client, version)
    if problem:  # another writer changed the version or its run under us
        raise CnmcError(f"{cfg.model_name!r} v{version.version} fails the provenance check ({problem}): no alias moved")
    _set_alias(client, cfg.model_name, cfg.candidate_alias, str(version.version))
    if release:
        moves, reason = _decide(client, cfg, best, version, protocol, data_hash)
    else:
        moves, reason = (
            False,
            (
                f"v{version.version} (run {run.info.run_id[:8]}, {cfg.rank_on} {cfg.metric} {best.value:.4f}) is "
                f"{cfg.candidate_alias!r}; not a release, {cfg.alias!r} untouched (`cnmc promote` releases)"
            ),
        )
    result = PromotionResult(
        name=cfg.model_name,
        version=str(version.version),
        run_id=run.info.run_id,
        metric=cfg.metric,
        value=best.value,
        rank_on=cfg.rank_on,
        data_hash=data_hash,
        protocol=protocol,
        backbone=run.data.tags.get("backbone", "unknown"),
        promoted=False,
        reason=reason,
        alias=cfg.alias,
        candidate_alias=cfg.candidate_alias,
        released=release,
        tracking_store=shown_uri(tracking_uri()),
    )
    if moves:
        _set_alias(client, cfg.model_name, cfg.alias, result.version)
    holder = _alias_holder(client, cfg.model_name, cfg.alias)
    champion_version = str(holder.version) if holder else ""
    # Promoted: released by this call (an experiment, which cannot release, never says promoted).
    promoted = release and champion_version == result.version
    return replace(result, promoted=promoted, champion_version=champion_version)


# -- choosing the run ------------------------------------------------------------------------------
def _best_candidate(client: MlflowClient, cfg: PromoteConfig, protocol: str, data_hash: str) -> _Candidate:
    experiment = experiment_name(protocol)
    todo = f"run `cnmc train` (or `dvc repro`) with split.protocol={protocol} on this data first"
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise CnmcError(f"no experiment {experiment!r} in this MLflow store: {todo}")
    runs = _search_runs(
        client,
        found.experiment_id,
        f"tags.protocol = {filter_literal(protocol)} and tags.data_hash = {filter_literal(data_hash)} "
        "and attributes.status = 'FINISHED'",
    )
    models = _logged_models(client, found.experiment_id)
    metric, tie = mlflow_key(cfg.rank_on, cfg.metric), mlflow_key(cfg.rank_on, cfg.tie_breaker)
    candidates = []
    for run in runs:
        value = run.data.metrics.get(metric)
        logged = models.get(run.info.run_id)
        if value is None or math.isnan(value) or logged is None:
            continue
        tie_value = run.data.metrics.get(tie, -math.inf)
        candidates.append(_Candidate(run, logged, value, -math.inf if math.isnan(tie_value) else tie_value))
    if not candidates:
        raise CnmcError(
            f"experiment {experiment!r} has no finished run with metric {metric!r} and a logged model "
            f"for protocol {protocol!r} and data hash {data_hash[:12]} ({len(runs)} finished runs on that data): {todo}"
        )
    return max(candidates, key=lambda c: c.key)


def _search_runs(client: MlflowClient, experiment_id: str, filter_string: str) -> list[Run]:
    runs: list[Run] = []
    token = None
    while True:
        page = client.search_runs(
            [experiment_id], filter_string, ViewType.ACTIVE_ONLY, max_results=1000, page_token=token
        )
        runs += page
        token = page.token
        if not token:
            return runs


def _logged_models(client: MlflowClient, experiment_id: str) -> dict[str, LoggedModel]:
    """The newest ready model named ``model`` of each run of the experiment, by run id."""
    out: dict[str, LoggedModel] = {}
    token = None
    while True:
        page = client.search_logged_models([experiment_id], filter_string=f"name = '{MODEL_NAME}'", page_token=token)
        for model in page:
            if model.status != LoggedModelStatus.READY or not model.source_run_id:
                continue
            seen = out.get(model.source_run_id)
            if seen is None or model.creation_timestamp > seen.creation_timestamp:
                out[model.source_run_id] = model
        token = page.token
        if not token:
            return out


# -- registering it ---------------------------------------------------------------------------------
def version_tags(run: Run, protocol: str, data_hash: str) -> dict[str, str]:
    """Tags of a version: its run's metrics at the reported threshold (validation and test),
    the threshold and provenance."""
    tags = {
        k: repr(float(v))
        for k, v in run.data.metrics.items()
        if k.startswith(tuple(MLFLOW_PREFIX.values())) and not k.startswith("test_t0.5_")
    }
    if "threshold" in run.data.metrics:
        tags["threshold"] = repr(float(run.data.metrics["threshold"]))
    run_tags = run.data.tags
    tags |= {
        "protocol": protocol,
        "data_hash": data_hash,
        "run_id": run.info.run_id,
        "backbone": run_tags.get("backbone", "unknown"),
        "git_commit": run_tags.get("git_commit", "unknown"),
    }
    return tags


def _registered_version(
    client: MlflowClient, name: str, best: _Candidate, protocol: str, data_hash: str
) -> ModelVersion:
    """The version of ``name`` made from the run: an existing one, else a new one."""
    run_id = best.run.info.run_id
    try:
        client.create_registered_model(
            name, description="C-NMC ALL-vs-Hem cell classifier; versions are promoted by `cnmc promote`."
        )
    except MlflowException as exc:
        if exc.error_code not in _EXISTS:
            raise
    existing = _versions_of_run(client, name, run_id)
    if existing:
        version = existing[0]
        log.info("run %s is already %s version %s", run_id, name, version.version)
        return version
    model_id = best.model.model_id
    created = client.create_model_version(
        name,
        source=f"models:/{model_id}",
        run_id=run_id,
        tags=version_tags(best.run, protocol, data_hash),
        model_id=model_id,
    )
    # Promotions running at once may each have registered the run: the first version stands, the
    # others remove their own, so every one of them goes on with the same version.
    first = _versions_of_run(client, name, run_id)[0]
    if str(first.version) != str(created.version):
        log.info(
            "run %s was registered at once as v%s: using that, removing v%s", run_id, first.version, created.version
        )
        client.delete_model_version(name, str(created.version))
        return first
    _link_logged_model(client, model_id, name, str(created.version))
    return created


def _versions_of_run(client: MlflowClient, name: str, run_id: str) -> list[ModelVersion]:
    """The versions of ``name`` made from the run, oldest first."""
    found = client.search_model_versions(f"name = {filter_literal(name)} and run_id = {filter_literal(run_id)}")
    return sorted(found, key=lambda v: int(v.version))


def filter_literal(value: str) -> str:
    """``value`` as a string literal of an MLflow search filter: in the quotes it does not contain."""
    for quote in ("'", '"'):
        if quote not in value:
            return f"{quote}{value}{quote}"
    raise CnmcError(f"{value!r} holds both kinds of quote: MLflow's search filters cannot name it; rename it")


def _link_logged_model(client: MlflowClient, model_id: str, name: str, version: str) -> None:
    """Record the version on the logged model, as ``mlflow.register_model`` does (UI links)."""
    key = "mlflow.modelVersions"
    try:
        existing = client.get_logged_model(model_id).tags.get(key)
        value = (json.loads(existing) if existing else []) + [{"name": name, "version": version}]
        client.set_logged_model_tags(model_id, {key: json.dumps(value)})
    except (MlflowException, ValueError) as exc:  # cosmetic: never fail a promotion over it
        log.warning("could not link logged model %s to %s v%s: %s", model_id, name, version, exc)


# -- the alias ------------------------------------------------------------------------------------------
def _set_alias(client: MlflowClient, name: str, alias: str, version: str, attempts: int = 5) -> None:
    """Point ``alias`` at ``version``; two promotions setting a new alias at once collide on its row
    (the store's unique key), and the one that lost simply sets it again."""
    for attempt in range(1, attempts + 1):
        try:
            client.set_registered_model_alias(name, alias, version)
            return
        except MlflowException as exc:
            if attempt == attempts or "UNIQUE constraint" not in exc.message and "duplicate key" not in exc.message:
                raise
            time.sleep(0.1 * attempt)


def _alias_holder(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:  # no such model, or no such alias yet
        if exc.error_code in _NOT_FOUND:
            return None
        raise


def _decide(
    client: MlflowClient, cfg: PromoteConfig, best: _Candidate, version: ModelVersion, protocol: str, data_hash: str
) -> tuple[bool, str]:
    """Whether the alias moves to ``version``, and why (one line)."""
    metric, alias = f"{cfg.rank_on} {cfg.metric}", cfg.alias
    new = f"v{version.version} (run {best.run.info.run_id[:8]}, {metric} {best.value:.4f})"
    holder = _alias_holder(client, cfg.model_name, alias)
    if holder is None:
        return True, f"no {alias!r} yet: {new} takes it"
    if str(holder.version) == str(version.version):
        return False, f"{new} is already {alias!r}; nothing changed"
    old = f"{alias} v{holder.version}"
    problem = version_problem(client, holder)
    if problem:
        return (
            True,
            f"{old} was not registered by `cnmc promote` from a finished cnmc run ({problem}): {new} takes {alias!r}",
        )
    info = _version_facts(client, holder, cfg)
    if (info["data_hash"], info["protocol"]) != (data_hash, protocol):
        return True, (
            f"{old} was trained on data {str(info['data_hash'])[:8]} under protocol {info['protocol']}, "
            f"not comparable with data {data_hash[:8]} under protocol {protocol}: "
            f"the best run of the current data, {new}, takes {alias!r}"
        )
    if info["value"] is None:
        return True, f"{old} has no {metric}: {new} takes {alias!r}"
    old_key, new_key = (info["value"], info["tie"]), (best.value, best.tie)
    if new_key > old_key:
        why = (
            f"{metric} {best.value:.4f} > {info['value']:.4f}"
            if best.value > info["value"]
            else f"{metric} tied at {best.value:.4f}, {cfg.tie_breaker} {best.tie:.4f} > {info['tie']:.4f}"
        )
        return True, f"{new} beats {old} on the same data and protocol ({why}): {alias!r} moves"
    return False, (
        f"{old} ({metric} {info['value']:.4f}) is at least as good as run "
        f"{best.run.info.run_id[:8]} ({best.value:.4f}) on the same data and protocol: "
        f"{alias!r} stays on v{holder.version}"
    )


def _version_facts(client: MlflowClient, version: ModelVersion, cfg: PromoteConfig) -> dict[str, Any]:
    """Data hash, protocol and metrics of a version: from its tags, else from its run."""
    tags = dict(version.tags or {})
    run_tags: dict[str, str] = {}
    run_metrics: dict[str, float] = {}
    value_key, tie_key = mlflow_key(cfg.rank_on, cfg.metric), mlflow_key(cfg.rank_on, cfg.tie_breaker)
    needed = ("data_hash", "protocol", value_key, tie_key)
    if version.run_id and any(k not in tags for k in needed):
        try:
            run = client.get_run(version.run_id)
            run_tags, run_metrics = run.data.tags, run.data.metrics
        except MlflowException:
            pass

    def number(key: str) -> float | None:
        raw = tags.get(key, run_metrics.get(key))
        try:
            value = float(raw) if raw is not None else None
        except ValueError:
            return None
        return None if value is None or math.isnan(value) else value

    tie = number(tie_key)
    return {
        "data_hash": tags.get("data_hash", run_tags.get("data_hash")),
        "protocol": tags.get("protocol", run_tags.get("protocol")),
        "value": number(value_key),
        "tie": -math.inf if tie is None else tie,
    }
