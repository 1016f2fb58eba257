"""Loading a served model without running its code.

``mlflow.pyfunc.load_model`` unpickles the model's ``python_model.pkl`` and imports the code logged
beside it: whoever can write a model folder, or move a registry alias on a tracking server without
authentication, runs code on the machine that loads it. A cnmc model needs none of that: its
weights (``torch.load(weights_only=True)``), its spec (JSON), its familiarity (``.npz`` without
pickle) and an ensemble's threshold (JSON) are data. :func:`load_served_model` reads the model's
``MLmodel`` file (YAML, safely), checks that it is laid out as cnmc logs its models, and builds the
classifier from those files with the code installed here; nothing of the model's own code or
pickle is read. A registry version is first checked against its run (:mod:`cnmc.tracking.version_check`):
a version ``cnmc promote`` did not make from a finished cnmc run is refused before its files are
downloaded. A model laid out otherwise, or such a version, is refused with one line, unless the caller
trusts it (``--trust-model``), in which case MLflow loads it as it would any model.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import Any

import pandas as pd
from mlflow.models import Model
from mlflow.pyfunc import PythonModelContext

from cnmc.core.errors import CnmcError
from cnmc.inference.schema import REQUEST_COLUMN
from cnmc.serving.pyfunc import EnsembleClassifier, LeukemiaClassifier

LOADER = "mlflow.pyfunc.model"
# The artifacts cnmc logs with a model (cnmc.serving.pyfunc.log_pyfunc): a member's weights, spec and
# familiarity, numbered from the second member on, and an ensemble's decision.
ARTIFACT = re.compile(r"^(weights|spec|familiarity)(_[1-9][0-9]*)?$|^ensemble$")
TRUST_HINT = "load it anyway with --trust-model only if you trust whoever logged it: its own code then runs"


class ServedModel:
    """A cnmc model built from its files: what ``mlflow.pyfunc.load_model`` gives (``metadata``,
    ``predict``, ``unwrap_python_model``), for the scoring server and batch prediction alike."""

    def __init__(self, metadata: Model, python_model: LeukemiaClassifier | EnsembleClassifier) -> None:
        self.metadata = metadata
        self._python_model = python_model

    def predict(self, data: Any, params: dict[str, Any] | None = None) -> pd.DataFrame:
        return self._python_model.predict(None, data, params=params)

    def unwrap_python_model(self) -> LeukemiaClassifier | EnsembleClassifier:
        return self._python_model


def load_served_model(model_uri: str, trust: bool = False) -> Any:
    """The model at ``model_uri`` (a registry, run or local URI), loaded without running its code
    (:class:`ServedModel`), or with ``trust`` as MLflow loads it. One-line :class:`CnmcError`s."""
    import mlflow

    if not trust:
        _check_registry_provenance(model_uri)
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri))
    except Exception as exc:  # MLflow raises many types for bad URIs, missing runs, bad stores
        first = (str(exc).strip().splitlines() or [exc.__class__.__name__])[0][:300]
        raise CnmcError(f"cannot load model {model_uri!r}: {first}") from None
    metadata = _metadata(local, model_uri)
    if trust:
        try:
            return mlflow.pyfunc.load_model(str(local))
        except Exception as exc:  # the model's own code may raise anything
            raise CnmcError(f"cannot load model {model_uri!r}: {exc.__class__.__name__}: {exc}"[:400]) from None
    problem = layout_problem(metadata)
    if problem:
        raise CnmcError(f"model {model_uri!r} is not laid out as cnmc logs its models ({problem}); {TRUST_HINT}")
    artifacts = {key: str(local / entry["path"]) for key, entry in _artifacts(metadata).items()}
    python_model = EnsembleClassifier() if "ensemble" in artifacts else LeukemiaClassifier()
    context_args = {"artifacts": artifacts, "model_config": {}}
    known = inspect.signature(PythonModelContext.__init__).parameters
    try:
        python_model.load_context(PythonModelContext(**{k: v for k, v in context_args.items() if k in known}))
    except Exception as exc:  # a damaged file: torch, JSON and numpy raise their own types
        raise CnmcError(f"model {model_uri!r}: cannot read its files ({exc.__class__.__name__}: {exc})"[:400]) from None
    return ServedModel(metadata, python_model)


def _check_registry_provenance(model_uri: str) -> None:
    """A registry version must be one ``cnmc promote`` made (:mod:`cnmc.tracking.version_check`)
    before any of its files is read; other URIs name files the user chose."""
    from mlflow.tracking import MlflowClient

    from cnmc.tracking.version_check import checked_version

    try:
        checked_version(MlflowClient(), model_uri)
    except CnmcError as exc:
        raise CnmcError(f"{exc}; {TRUST_HINT}") from None


def _metadata(local: Path, model_uri: str) -> Model:
    mlmodel = local / "MLmodel"
    if not mlmodel.is_file():
        raise CnmcError(f"model {model_uri!r} has no MLmodel file: not an MLflow model")
    try:
        return Model.load(str(mlmodel))
    except Exception as exc:  # YAML errors, missing keys
        raise CnmcError(f"model {model_uri!r}: unreadable MLmodel ({exc.__class__.__name__})") from None


def _artifacts(metadata: Model) -> dict[str, dict[str, str]]:
    flavour = metadata.flavors.get("python_function") or {}
    artifacts = flavour.get("artifacts")
    return artifacts if isinstance(artifacts, dict) else {}


def layout_problem(metadata: Model) -> str:
    """Why an MLmodel is not one cnmc logs, or ""."""
    flavour = metadata.flavors.get("python_function")
    if not isinstance(flavour, dict):
        return "no python_function flavour"
    if flavour.get("loader_module") != LOADER:
        return f"its loader is {flavour.get('loader_module')!r}, not {LOADER}"
    artifacts = _artifacts(metadata)
    if not {"weights", "spec"} <= set(artifacts):
        return "no weights and spec artifacts"
    strange = sorted(key for key in artifacts if not ARTIFACT.match(str(key)))
    if strange:
        return f"unknown artifacts {', '.join(strange[:3])}"
    for key, entry in artifacts.items():
        path = str(entry.get("path", "")) if isinstance(entry, dict) else ""
        if not path.startswith("artifacts/") or ".." in Path(path).parts:
            return f"artifact {key!r} lies outside the model's artifacts folder"
    schema = metadata.get_input_schema()
    if schema is None or REQUEST_COLUMN not in (schema.input_names() if schema.has_input_names() else []):
        return f"it does not take an '{REQUEST_COLUMN}' column"
    return ""
