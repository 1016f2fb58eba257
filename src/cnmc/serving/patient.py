"""``POST /patient`` and the page at ``GET /`` of ``cnmc serve``: one person's cells in, each cell's
answer and the person's call (:mod:`cnmc.metrics.patients`) out.

MLflow's scoring protocol (``/invocations``) answers cell by cell and has no place for a summary,
so the patient request has a route of its own, beside it and unchanged: a JSON object
``{"images": [<base64>, ...], "names": [...], "subject": "..."}`` (names and subject optional).
Every image is checked and scored as ``cnmc predict`` does (:func:`cnmc.serving.scoring.score_images`):
a bad one becomes its row's ``error`` and does not stop the others. The server's image cap
answers 413, a body that is not such an object 400; the body limit is the guard's.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from http import HTTPStatus
from importlib import resources
from typing import Any

from cnmc.core.errors import CnmcError
from cnmc.inference.schema import CELL_NAME, no_answer, threshold_of
from cnmc.metrics.patients import call_person
from cnmc.serving.scoring import score_images

PAGE = "patient.html"


class PatientRequestError(CnmcError):
    """A patient request the server refuses, with the HTTP status to answer."""

    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


def parse_request(body: bytes, max_batch: int) -> tuple[list[str], list[str], str]:
    """``(images, names, subject)`` of a patient request body, or :class:`PatientRequestError`."""
    try:
        request = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PatientRequestError(HTTPStatus.BAD_REQUEST, f"the body is not JSON ({exc.__class__.__name__})") from None
    if not isinstance(request, dict) or not isinstance(request.get("images"), list):
        raise PatientRequestError(
            HTTPStatus.BAD_REQUEST, 'expected a JSON object {"images": [<base64 image>, ...], "names": [...]}'
        )
    images, names = request["images"], request.get("names") or []
    if not images:
        raise PatientRequestError(HTTPStatus.BAD_REQUEST, "no images: a call needs at least one cell")
    if len(images) > max_batch:
        raise PatientRequestError(
            HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
            f"{len(images)} images in one request; this server takes at most {max_batch} a request "
            "(cnmc serve --max-batch)",
        )
    if not all(isinstance(image, str) for image in images):
        raise PatientRequestError(HTTPStatus.BAD_REQUEST, "every entry of 'images' must be a base64 string")
    if not isinstance(names, list) or (names and len(names) != len(images)):
        raise PatientRequestError(HTTPStatus.BAD_REQUEST, "'names', when given, must list one name per image")
    subject = str(request.get("subject") or "patient")
    names = [str(n) for n in names] or [f"cell {k + 1}" for k in range(len(images))]
    for field, text in [("subject", subject), *(("names", n) for n in names)]:
        _encodable(field, text)
    return images, names, subject


def _encodable(field: str, text: str) -> None:
    """A 400 for a string no answer could carry: JSON lets a lone surrogate (``\\ud800``) through, UTF-8 not."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise PatientRequestError(
            HTTPStatus.BAD_REQUEST, f"'{field}' holds a lone surrogate (\\ud800-\\udfff), not a Unicode character"
        ) from None


def answer_patient(model: Any, images: list[str], names: list[str], subject: str) -> dict[str, Any]:
    """Each cell's answer (in request order) and the person's call from the readable ones."""
    decoded: list[bytes | None] = []
    for image in images:
        try:
            decoded.append(base64.b64decode(image, validate=True))
        except (binascii.Error, ValueError):
            decoded.append(None)
    readable = [data for data in decoded if data is not None]
    scored = iter(score_images(model, readable))
    cells: list[dict[str, Any]] = []
    for name, data in zip(names, decoded, strict=True):
        result = next(scored) if data is not None else {"error": "not base64: the image must be base64-encoded"}
        cells.append({CELL_NAME.name: name} | no_answer() | result)
    probs = [float(c["prob_all"]) if c["error"] is None else math.nan for c in cells]
    threshold = threshold_of(cells)
    unreadable = sum(c["error"] is not None for c in cells)
    ood = [bool(c["ood"]) for c in cells]
    hashes = [str(c["pixel_hash"] or "") for c in cells]
    person = {"subject": subject} | call_person(probs, threshold, unreadable, ood=ood, pixel_hashes=hashes)
    return {"patient": _json_safe(person), "cells": cells}


def page_html() -> str:
    """The page: one static file, its script inline, nothing fetched from elsewhere."""
    return (resources.files("cnmc.serving") / "static" / PAGE).read_text(encoding="utf-8")


def _json_safe(row: dict[str, Any]) -> dict[str, Any]:
    """NaN (no readable cell) as JSON null."""
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
