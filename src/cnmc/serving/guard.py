"""An ASGI middleware in front of MLflow's scoring app, for clients behind a load balancer or a
hospital gateway: every error is JSON, small and free of tracebacks, and no request is big enough
to take the server down.

MLflow's app (``mlflow.pyfunc.scoring_server.init``) answers a missing ``Content-Type`` with 500,
a wrong type or charset with a plain-text 415, a bad body with JSON that may carry a full stack
trace and the whole request echoed back (5 MB in, 5 MB out). :class:`HttpGuard`:

- refuses a ``POST /invocations`` whose ``Content-Type`` MLflow would not parse with 415 JSON,
  before reading the body (the same rules MLflow applies, so good requests pass unchanged);
- reads the body itself, up to ``max_body_bytes``: beyond it, 413 while reading (the declared
  ``Content-Length`` is refused up front, and chunked bodies are counted as they arrive), so a
  body is never held, let alone decoded, past the limit;
- rewrites every 4xx/5xx answer, whatever produced it (MLflow, FastAPI, an exception), into
  ``{"error_code": ..., "message": ...}``: one line, at most :data:`MESSAGE_LIMIT` characters,
  MLflow's echoes of the request and its tracebacks removed. Good answers pass byte for byte.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Awaitable, Callable, MutableMapping
from http import HTTPStatus
from typing import Any

from mlflow.pyfunc.scoring_server import CONTENT_TYPES, SCORING_PROTOCOL_CHANGE_INFO

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[MutableMapping[str, Any], Receive, Send], Awaitable[None]]

INVOCATIONS = "/invocations"
MESSAGE_LIMIT = 256  # characters of an error message; longer ones keep their start and their end
_HEAD = 100
_ELLIPSIS = " ... "
# Text MLflow wraps around the real problem: the parsed input before the model's message, the raw
# body after a JSON error, and tracebacks (besides a paragraph about its 2.0 protocol change).
_ECHOES = (
    re.compile(r"\AFailed to predict data '.*?'\.\s*Error:\s*", re.S),
    re.compile(r"\s*Input:\s.*\Z", re.S),
    re.compile(r"\s*Traceback \(most recent call last\).*\Z", re.S),
)

log = logging.getLogger(__name__)


def status_name(status: int) -> str:
    """The error code of a status that has none from MLflow: ``UNSUPPORTED_MEDIA_TYPE`` for 415."""
    try:
        return HTTPStatus(status).name
    except ValueError:
        return "HTTP_ERROR"


def client_message(text: str) -> str:
    """``text`` as a client may see it: one line, no traceback, no echo of the request, short."""
    text = text.replace(SCORING_PROTOCOL_CHANGE_INFO, " ")
    for echo in _ECHOES:
        text = echo.sub(" ", text)
    text = " ".join(text.split())
    if len(text) > MESSAGE_LIMIT:
        tail = MESSAGE_LIMIT - _HEAD - len(_ELLIPSIS)
        text = text[:_HEAD] + _ELLIPSIS + text[-tail:]
    return text


def error_body(status: int, body: bytes) -> bytes:
    """The JSON error for an error answer ``body`` (MLflow's JSON, FastAPI's ``detail``, or text)."""
    code: object = None
    try:
        document = json.loads(body)
    except ValueError:
        document = None
    if isinstance(document, dict):
        code = document.get("error_code")
        message = document.get("message", document.get("detail", ""))
    else:
        message = body.decode("utf-8", "replace")
    return json.dumps(
        {
            "error_code": code if isinstance(code, str) and code else status_name(status),
            "message": client_message(str(message)) or HTTPStatus(status).phrase,
        }
    ).encode()


def content_type_problem(header: str | None) -> str | None:
    """Why MLflow would refuse this ``Content-Type`` (its own rules: exact media type, no
    parameter but ``charset``, UTF-8 only), or None."""
    expected = ", ".join(CONTENT_TYPES)
    if not header:
        return f"missing Content-Type header (expected one of {expected})"
    media_type, *parameters = (part.strip() for part in header.split(";"))
    if media_type not in CONTENT_TYPES:
        return f"unsupported Content-Type {media_type[:60]!r} (expected one of {expected})"
    values = {key: value for key, _, value in (p.partition("=") for p in parameters)}
    if unknown := sorted(set(values) - {"charset"}):
        return f"unsupported Content-Type parameters {', '.join(unknown)[:60]!r} (only charset=utf-8)"
    if values.get("charset", "utf-8").lower() != "utf-8":
        return f"unsupported charset {values['charset'][:30]!r} (only utf-8)"
    return None


class TooLarge(Exception):
    """The request body passed the limit (or said it would)."""


class HttpGuard:
    """Wraps an ASGI app: see the module's docstring."""

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # lifespan events pass through
            await self.app(scope, receive, send)
            return
        if scope["path"] == INVOCATIONS and scope["method"] == "POST":
            problem = content_type_problem(_header(scope, b"content-type"))
            if problem:
                await send_error(send, HTTPStatus.UNSUPPORTED_MEDIA_TYPE, problem)
                return
        try:
            body = await self._read_body(_header(scope, b"content-length"), receive)
        except TooLarge as exc:
            await send_error(send, HTTPStatus.REQUEST_ENTITY_TOO_LARGE, str(exc))
            return
        if body is None:  # the client went away
            return
        answer = _ErrorsAsJson(send)
        try:
            await self.app(scope, _replay(body, receive), answer.send)
        except Exception:
            log.exception("unhandled error answering %s %s", scope["method"], scope["path"])
            if not answer.forwarded:
                await send_error(send, HTTPStatus.INTERNAL_SERVER_ERROR, "internal server error")

    async def _read_body(self, declared: str | None, receive: Receive) -> bytes | None:
        """The whole body, or :class:`TooLarge` as soon as it passes the limit; None on disconnect."""
        limit = f"the server's limit of {self.max_body_bytes:,} bytes"
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise TooLarge(f"Content-Length {int(declared):,} bytes is over {limit}")
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise TooLarge(f"request body over {limit}")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def _header(scope: MutableMapping[str, Any], name: bytes) -> str | None:
    """The first value of a request header (as Starlette's ``headers.get``, which MLflow reads)."""
    return next((v.decode("latin-1") for k, v in scope["headers"] if k.lower() == name), None)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that hands the app the body already read, then the client's own events."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replay() -> Message:
        return pending.pop() if pending else await receive()

    return replay


class _ErrorsAsJson:
    """A ``send`` that passes answers under 400 through untouched and turns error answers into
    :func:`error_body` (holding their body until it is complete)."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self.forwarded = False  # something went to the client: too late for another answer
        self._status = 0
        self._chunks: list[bytes] | None = None  # an error answer's body so far

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start" and message["status"] >= 400:
            self._status, self._chunks = message["status"], []
        elif self._chunks is not None and message["type"] == "http.response.body":
            self._chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                self.forwarded = True
                await _send_json(self._send, self._status, error_body(self._status, b"".join(self._chunks)))
        else:
            self.forwarded = True
            await self._send(message)


async def send_error(send: Send, status: int, message: str) -> None:
    """Answer with our own JSON error."""
    await _send_json(
        send, status, json.dumps({"error_code": status_name(status), "message": client_message(message)}).encode()
    )


async def _send_json(send: Send, status: int, body: bytes) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
