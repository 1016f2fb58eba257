"""Whether a registry version is one ``cnmc promote`` made, read from the tracking store alone.

Anyone who can write a tracking server without authentication can register any folder and move
``champion`` to it. Before a version is loaded or an alias moved to it, its provenance is checked
without reading any of its files: it names a run, the run is in this store and FINISHED, carries
the tags every cnmc training run gets (:func:`cnmc.tracking.runs.provenance_tags`), and the version's
source is that run's own logged model. The model's layout is checked afterwards, from its files
(:mod:`cnmc.serving.trusted`).
"""

from __future__ import annotations

from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from cnmc.core.errors import CnmcError
from cnmc.tracking.provenance import without_passwords
from cnmc.tracking.runs import PROVENANCE_TAGS

_REGISTRY_PREFIX = "models:/"


def registry_version(client: MlflowClient, model_uri: str) -> ModelVersion | None:
    """The version a ``models:/NAME@ALIAS`` or ``models:/NAME/N`` URI names (None for any other URI,
    a logged model's ``models:/m-...`` included); a one-line error where it names none."""
    if not model_uri.startswith(_REGISTRY_PREFIX):
        return None
    rest = model_uri[len(_REGISTRY_PREFIX) :].strip("/")
    name, at, alias = rest.partition("@")
    try:
        if at:
            return client.get_model_version_by_alias(name, alias)
        name, slash, number = rest.rpartition("/")
        if slash and number.isdigit():
            return client.get_model_version(name, number)
    except MlflowException as exc:  # no such name or alias, or a store that does not answer
        first = without_passwords((exc.message.strip().splitlines() or [""])[0][:200])
        raise CnmcError(
            f"model {without_passwords(model_uri)!r}: cannot read the version from the registry ({first})"
        ) from None
    return None  # models:/m-<id>: a logged model, not a registry version


def version_problem(client: MlflowClient, version: ModelVersion) -> str:
    """Why ``version`` is not one ``cnmc promote`` registered from a finished cnmc run, or ""."""
    run_id = version.run_id or ""
    if not run_id:
        return "it names no run"
    try:
        run = client.get_run(run_id)
    except MlflowException:
        return f"its run {run_id} is not in this tracking store"
    if run.info.status != "FINISHED":
        return f"its run {run_id[:8]} is {run.info.status}, not FINISHED"
    missing = [tag for tag in PROVENANCE_TAGS if not run.data.tags.get(tag)]
    if missing:
        return f"its run {run_id[:8]} lacks the tags a cnmc training run carries ({', '.join(missing)})"
    if not _is_runs_logged_model(client, version, run_id):
        return f"its source {str(version.source)[:120]!r} is not run {run_id[:8]}'s logged model"
    return ""


def _is_runs_logged_model(client: MlflowClient, version: ModelVersion, run_id: str) -> bool:
    """Whether the version's source is ``runs:/<run>/model`` (MLflow 2) or ``models:/<id>`` of a logged
    model of that run (MLflow 3; the stores do not all keep the version's ``model_id``, the source does)."""
    source = str(version.source or "")
    if source == f"runs:/{run_id}/model":
        return True
    model_id = source.removeprefix(_REGISTRY_PREFIX)
    if model_id == source or not model_id.startswith("m-") or "/" in model_id:
        return False
    try:
        return client.get_logged_model(model_id).source_run_id == run_id
    except MlflowException:
        return False


def checked_version(client: MlflowClient, model_uri: str) -> None:
    """A one-line error where ``model_uri`` names a registry version that fails :func:`version_problem`."""
    version = registry_version(client, model_uri)
    if version is None:
        return
    problem = version_problem(client, version)
    if problem:
        raise CnmcError(
            f"model {model_uri!r} (version {version.version} of {version.name!r}) was not registered by "
            f"`cnmc promote` from a finished cnmc run: {problem}"
        )
