"""``cnmc serve``: MLflow's own scoring app for a registered model, in one uvicorn process, behind
:class:`cnmc.serving.guard.HttpGuard`, with a cap on images per request and ``GET /info``.

The app is the one ``mlflow models serve`` runs (``mlflow.pyfunc.scoring_server.init``), so good
requests take the same formats and get byte-identical answers; only errors, limits and ``/info``
differ. An alias (``models:/name@champion``) is resolved to its version once, before loading, so
that ``/info`` names exactly the version served; moving the alias takes a restart.
"""

from __future__ import annotations

import logging
import signal
from dataclasses import asdict, dataclass
from http import HTTPStatus
from typing import Any

import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import BAD_REQUEST
from mlflow.tracking import MlflowClient

from cnmc.core.errors import CnmcError
from cnmc.serving.connections import limited_protocol
from cnmc.serving.guard import LOOPBACK_NAMES, HttpGuard, status_name, too_many_images

log = logging.getLogger(__name__)

MIB = 1024 * 1024


class TooManyImages(MlflowException):
    """More images in one request than the server takes: 413, before MLflow's schema check."""

    def __init__(self, count: int, limit: int) -> None:
        super().__init__(too_many_images(count, limit), error_code=BAD_REQUEST)
        self.error_code = status_name(HTTPStatus.REQUEST_ENTITY_TOO_LARGE)

    def get_http_status_code(self) -> int:
        return HTTPStatus.REQUEST_ENTITY_TOO_LARGE


def image_count(data: Any) -> int:
    """How many images MLflow's parsed input holds, whatever the request format: the rows of a
    frame, the values of the largest column of a dict, the values of an array or list (the shapes
    :func:`cnmc.serving.pyfunc._image_values` takes). Costs nothing next to decoding one image."""
    if isinstance(data, dict):
        return max((image_count(value) for value in data.values()), default=0)
    if isinstance(data, np.ndarray):
        return int(data.size)
    if isinstance(data, (pd.DataFrame, pd.Series, list, tuple)):
        return len(data)
    return 1


class BatchLimited:
    """The loaded pyfunc, refusing requests of more than ``max_batch`` images before MLflow
    enforces its schema and before the model decodes a single image; everything else is the
    model's own (``metadata``, ``predict``'s ``params``)."""

    def __init__(self, model: Any, max_batch: int) -> None:
        self._model = model
        self.max_batch = max_batch

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def predict(self, data: Any, params: dict[str, Any] | None = None) -> Any:
        if (count := image_count(data)) > self.max_batch:
            raise TooManyImages(count, self.max_batch)
        return self._model.predict(data, params=params)


def pin_version(model_uri: str, client: MlflowClient) -> tuple[str, str | None, str | None]:
    """``(uri to load, registered name, version)``: a ``models:/name@alias`` (or stage, or latest)
    URI becomes ``models:/name/<version>``; other URIs stay as they are, with no name or version."""
    from mlflow.store.artifact.utils.models import get_model_name_and_version

    if not model_uri.startswith("models:/"):
        return model_uri, None, None
    found = get_model_name_and_version(client, model_uri)
    if len(found) != 2:  # models:/<logged model id>: not a registered version
        return model_uri, None, None
    name, version = found
    return f"models:/{name}/{version}", name, str(version)


def model_facts(
    model: Any, model_uri: str, name: str | None, version: str | None, client: MlflowClient
) -> dict[str, Any]:
    """What ``GET /info`` answers: the registered version, its run, and the served pyfunc's spec
    (backbone, input size, decision threshold, temperature); the data hash is the run's tag."""
    run_id = model.metadata.run_id
    spec = getattr(model.unwrap_python_model(), "spec", None)
    data_hash = None
    if run_id:
        try:
            data_hash = client.get_run(run_id).data.tags.get("data_hash")
        except MlflowException as exc:  # a model file served without its tracking store
            log.warning("no run %s in the tracking store (%s): /info has no data hash", run_id, exc.error_code)
    return {
        "model_uri": model_uri,
        "registered_model": name,
        "version": version,
        "run_id": run_id,
        "backbone": getattr(spec, "backbone", None),
        "image_size": getattr(spec, "image_size", None),
        "threshold": getattr(spec, "threshold", None),
        "temperature": getattr(spec, "temperature", None),
        "tta": getattr(spec, "tta", None),  # whether the answer averages the 8 flips and turns by default
        "data_hash": data_hash,
    }


ROUTES = {
    "GET /": "a page: drop one patient's cell images, see each cell and the patient's call",
    "POST /invocations": "MLflow's scoring protocol: one answer per cell",
    "POST /patient": 'one person\'s cells {"images": [<base64>, ...], "names": [...], "subject": "..."}: '
    "each cell's answer and the person's call (mean p(ALL) with a bootstrap interval)",
    "GET /info": "this page of facts",
}


@dataclass(frozen=True)
class ServerLimits:
    """What one ``cnmc serve`` process takes at most (``cnmc serve --help``)."""

    max_batch: int = 64  # images a request
    max_body_bytes: int = 64 * MIB  # sent, and decoded (Parquet)
    max_connections: int = 64  # open at once; beyond: 503 with Retry-After
    max_in_flight: int = 8  # requests being answered at once; beyond: 503 with Retry-After
    timeout_s: float = 30.0  # for a request's headers, and again for its body
    keep_alive_s: int = 5  # seconds an idle connection is kept between requests
    allowed_hosts: frozenset[str] = LOOPBACK_NAMES  # Host names (and origins) answered; others get 403


def build_app(model: Any, facts: dict[str, Any], limits: ServerLimits) -> HttpGuard:
    """MLflow's scoring app for ``model`` (``/invocations``, ``/ping``, ``/health``, ``/version``)
    with ``/info``, ``/patient`` and the page at ``/`` added, wrapped in the guard."""
    from mlflow.pyfunc import scoring_server
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request
    from starlette.responses import HTMLResponse, JSONResponse

    from cnmc.metrics.patients import MIN_CELLS
    from cnmc.serving.patient import PatientRequestError, answer_patient, page_html, parse_request

    max_batch = limits.max_batch
    app = scoring_server.init(BatchLimited(model, max_batch))  # type: ignore[arg-type]  # a PyFuncModel proxy
    info = {
        **facts,
        **asdict(limits),
        "allowed_hosts": sorted(limits.allowed_hosts),  # a frozenset is no JSON
        "patient_min_cells": MIN_CELLS,
        "routes": ROUTES,
    }
    page = page_html()

    async def get_info(request: Request) -> JSONResponse:
        return JSONResponse(info)

    async def get_page(request: Request) -> HTMLResponse:
        return HTMLResponse(page)

    async def post_patient(request: Request) -> JSONResponse:
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/json":
            return _error(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "POST /patient takes Content-Type: application/json")
        try:
            images, names, subject = parse_request(await request.body(), max_batch)
        except PatientRequestError as exc:
            return _error(exc.status, str(exc))
        return JSONResponse(await run_in_threadpool(answer_patient, model, images, names, subject))

    app.add_route("/info", get_info, methods=["GET"])
    app.add_route("/", get_page, methods=["GET"])
    app.add_route("/patient", post_patient, methods=["POST"])
    return HttpGuard(
        app, limits.max_body_bytes, limits.max_in_flight, limits.timeout_s, limits.max_batch, limits.allowed_hosts
    )


def _error(status: HTTPStatus, message: str) -> Any:
    from starlette.responses import JSONResponse

    return JSONResponse({"error_code": status_name(status), "message": message}, status_code=status)


def serve(model_uri: str, host: str, port: int, limits: ServerLimits, trust: bool = False) -> None:
    """Load the model and serve it until SIGTERM or Ctrl+C. SIGTERM is graceful: uvicorn stops
    accepting, lets the requests in flight finish, and the process then exits 0.

    One process: the model's forward pass runs in threads that share its weights, and a second
    process would hold a second copy for no gain on a CPU that one process's threads already fill;
    run more instances behind the load balancer to scale out."""
    import mlflow
    import uvicorn

    from cnmc.serving.scoring import load_image_model
    from cnmc.tracking.provenance import tracking_uri

    signal.signal(signal.SIGTERM, _exit_zero)  # uvicorn re-raises it once it has drained
    mlflow.set_tracking_uri(tracking_uri())
    client = MlflowClient()
    try:
        pinned, name, version = pin_version(model_uri, client)
    except MlflowException as exc:
        raise CnmcError(f"cannot resolve model {model_uri!r}: {exc.message.splitlines()[0][:300]}") from None
    model = load_image_model(pinned, trust)
    facts = model_facts(model, model_uri, name, version, client)
    log.info("serving %s (%s) on http://%s:%d", model_uri, pinned, host, port)
    app = build_app(model, facts, limits)
    protocol = limited_protocol(limits.max_connections, limits.timeout_s)
    uvicorn.run(app, host=host, port=port, log_level="info", http=protocol, timeout_keep_alive=limits.keep_alive_s)


def _exit_zero(signum: int, frame: Any) -> None:
    raise SystemExit(0)
