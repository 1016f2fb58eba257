"""An ASGI middleware in front of MLflow's scoring app, for clients behind a load balancer or a
hospital gateway: every error is JSON, small and free of tracebacks, and no request is big enough
to take the server down, and no page but ours can use it.

MLflow's app (``mlflow.pyfunc.scoring_server.init``) answers a missing ``Content-Type`` with 500,
a wrong type or charset with a plain-text 415, a bad body with JSON that may carry a full stack
trace and the whole request echoed back (5 MB in, 5 MB out). :class:`HttpGuard`:

- answers only the names it serves (``Host``: 127.0.0.1, localhost and ``cnmc serve --allowed-host``)
  and only requests from its own pages (an ``Origin`` header naming another site is refused), with
  403: a page the user visits cannot rebind its name to 127.0.0.1 and post a patient's cells;
- refuses a ``POST /invocations`` whose ``Content-Type`` MLflow would not parse with 415 JSON,
  before reading the body (the same rules MLflow applies, so good requests pass unchanged);
- reads the body itself, up to ``max_body_bytes``: beyond it, 413 while reading (the declared
  ``Content-Length`` is refused up front, and chunked bodies are counted as they arrive), so a
  body is never held, let alone decoded, past the limit;
- answers ``503`` with ``Retry-After`` when ``max_in_flight`` requests are being answered already,
  so memory stays bounded by that many bodies whatever the number of clients;
- gives the body ``body_timeout_s`` to arrive (``408`` after it, for a body sent a byte at a time or
  never finished), the headers' deadline being the protocol's (:mod:`cnmc.serving.connections`);
- checks what MLflow would decode before it does: JSON nested past a sane depth or holding a number
  too long to convert, or a string holding a NUL, is ``400``; a Parquet body whose pages (by their
  own headers, not the footer's claims) or dictionaries (spread over their rows) decode past
  ``max_body_bytes`` is ``413`` (:mod:`cnmc.serving.parquet_limits`: the limit counts decoded bytes);
- marks a request abandoned (:mod:`cnmc.serving.abandoned`) when its client goes away or the app
  stops waiting for it, so that the model stops decoding and predicting for nobody;
- rewrites every 4xx/5xx answer, whatever produced it (MLflow, FastAPI, an exception), into
  ``{"error_code": ..., "message": ...}``: one line, at most :data:`MESSAGE_LIMIT` characters,
  MLflow's echoes of the request and its tracebacks removed. Good answers pass byte for byte.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
from collections.abc import Awaitable, Callable, MutableMapping
from http import HTTPStatus
from typing import Any

from mlflow.pyfunc.scoring_server import (
    CONTENT_TYPE_JSON,
    CONTENT_TYPE_PARQUET,
    CONTENT_TYPES,
    SCORING_PROTOCOL_CHANGE_INFO,
)

from cnmc.serving.abandoned import request_scope
from cnmc.serving.parquet_limits import UnreadableParquet, page_totals, spread_size

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[MutableMapping[str, Any], Receive, Send], Awaitable[None]]

INVOCATIONS = "/invocations"
JSON_ROUTES = (INVOCATIONS, "/patient")
MAX_JSON_DEPTH = 32  # a request is a list of base64 strings in one or two wrappers
MESSAGE_LIMIT = 256  # characters of an error message; longer ones keep their start and their end
_HEAD = 100
_ELLIPSIS = " ... "
# Text MLflow wraps around the real problem: the parsed input before the model's message, the raw
# body after a JSON error, and tracebacks (besides a paragraph about its 2.0 protocol change).
_ECHOES = (
    re.compile(r"\AFailed to predict data '.*?'\.\s*Error:\s*", re.S),
    re.compile(r"\AFailed to enforce schema of data '.*' with schema '.*?'\.\s*Error:\s*", re.S),
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


class Refused(Exception):
    """A request answered with ``status`` and this message, before the app sees it."""

    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


def too_many_images(count: int, limit: int) -> str:
    return f"{count} images in one request; this server takes at most {limit} a request (send them in several requests)"


def body_problem(content_type: str | None, body: bytes, max_decoded_bytes: int, max_rows: int) -> Refused | None:
    """What MLflow would choke on when decoding ``body``: deep or unconvertible JSON, a Parquet
    body of more rows or values than a request may hold, or whose pages (by their own headers) or
    dictionaries (spread over their rows) decode past the limit (:mod:`cnmc.serving.parquet_limits`),
    or an unreadable one. None for anything else."""
    media_type = (content_type or "").split(";")[0].strip().lower()
    if media_type == CONTENT_TYPE_JSON and body:
        try:
            _check_json(json.loads(body))
        except RecursionError:
            return Refused(HTTPStatus.BAD_REQUEST, f"the JSON body is nested deeper than {MAX_JSON_DEPTH} levels")
        except _NulInString:  # numpy and pandas drop it silently: "\u0000" would read as an empty image
            return Refused(HTTPStatus.BAD_REQUEST, "a string of the JSON body holds a NUL character (\\u0000)")
        except ValueError as exc:  # not JSON, or an integer of more digits than Python converts
            return Refused(HTTPStatus.BAD_REQUEST, f"the body is not valid JSON ({str(exc).split(':')[0]})")
    elif media_type == CONTENT_TYPE_PARQUET:
        import pyarrow.parquet as pq

        try:
            metadata = pq.ParquetFile(io.BytesIO(body)).metadata
        except Exception:  # pyarrow raises several types for bytes that are not Parquet
            return Refused(HTTPStatus.BAD_REQUEST, "the body is not a readable Parquet file")
        if metadata.num_rows > max_rows:
            return Refused(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, too_many_images(metadata.num_rows, max_rows))
        try:  # the footer's own sizes are a claim: the pages' headers and the dictionaries' spread are not
            decoded, values = page_totals(body, metadata)
            if values > max_rows * max(metadata.num_columns, 1):
                return Refused(
                    HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                    f"the Parquet body holds {values:,} values: more than {max_rows} rows of its columns",
                )
            if decoded <= max_decoded_bytes:
                decoded += spread_size(body, metadata)
        except UnreadableParquet:
            return Refused(HTTPStatus.BAD_REQUEST, "the body is not a readable Parquet file")
        if decoded > max_decoded_bytes:
            return Refused(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"the Parquet body decompresses to {decoded:,} bytes, over the server's limit of {max_decoded_bytes:,}",
            )
    return None


class _NulInString(ValueError):
    pass


def _check_json(document: object, depth: int = 0) -> None:
    """Raises RecursionError past :data:`MAX_JSON_DEPTH`, :class:`_NulInString` for a string or key with a NUL."""
    if depth > MAX_JSON_DEPTH:
        raise RecursionError
    if (
        isinstance(document, str)
        and "\x00" in document
        or isinstance(document, dict)
        and any("\x00" in k for k in document)
    ):
        raise _NulInString
    children = document.values() if isinstance(document, dict) else document if isinstance(document, list) else ()
    for child in children:
        _check_json(child, depth + 1)


LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1"})


def host_name(value: str) -> str:
    """The host of a ``Host`` header or of an origin's authority, lower case, without port or brackets."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def foreign_request(scope: MutableMapping[str, Any], allowed: frozenset[str]) -> str | None:
    """Why a request comes from somewhere this server does not serve, or None: a ``Host`` not among
    ``allowed`` (DNS rebinding), or an ``Origin`` whose host is not (another site's page)."""
    host = _header(scope, b"host")
    if host is not None and host_name(host) not in allowed:
        return f"host {host[:80]!r} is not served here (cnmc serve --allowed-host NAME adds a name)"
    origin = _header(scope, b"origin")
    if origin is not None:
        scheme, _, authority = origin.partition("://")
        if not authority or host_name(authority.split("/", 1)[0]) not in allowed:
            return f"cross-origin request from {origin[:80]!r} refused: only this server's own page may call it"
    return None


class HttpGuard:
    """Wraps an ASGI app: see the module's docstring."""

    def __init__(
        self,
        app: ASGIApp,
        max_body_bytes: int,
        max_in_flight: int = 8,
        body_timeout_s: float = 30.0,
        max_rows: int = 64,
        allowed_hosts: frozenset[str] = LOOPBACK_NAMES,
    ) -> None:
        self.app = app
        self.allowed_hosts = frozenset(name.lower() for name in allowed_hosts)
        self.max_body_bytes = max_body_bytes
        self.max_rows = max_rows
        self.max_in_flight = max_in_flight
        self.body_timeout_s = body_timeout_s
        self.in_flight = 0

    async def __call__(self, scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # lifespan events pass through
            await self.app(scope, receive, send)
            return
        if foreign := foreign_request(scope, self.allowed_hosts):
            await send_error(send, HTTPStatus.FORBIDDEN, foreign)
            return
        if _header(scope, b"transfer-encoding") is not None and _header(scope, b"content-length") is not None:
            # RFC 9112 6.3: both framings in one request may smuggle a second one; answer, then close.
            message = "a request with both Content-Length and Transfer-Encoding is ambiguous: refused"
            await send_error(send, HTTPStatus.BAD_REQUEST, message, close=True)
            return
        if scope["path"] == INVOCATIONS and scope["method"] == "POST":
            problem = content_type_problem(_header(scope, b"content-type"))
            if problem:
                await send_error(send, HTTPStatus.UNSUPPORTED_MEDIA_TYPE, problem)
                return
        if self.in_flight >= self.max_in_flight:
            message = f"the server is answering {self.max_in_flight} requests already; retry in a second"
            await send_error(send, HTTPStatus.SERVICE_UNAVAILABLE, message, retry_after=1)
            return
        self.in_flight += 1
        try:
            await self._answer(scope, receive, send)
        finally:
            self.in_flight -= 1

    async def _answer(self, scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
        content_type = _header(scope, b"content-type")
        try:
            body = await self._read_body(_header(scope, b"content-length"), receive)
            checked = body is not None and scope["method"] == "POST" and scope["path"] in JSON_ROUTES
            problem = checked and body_problem(content_type, body or b"", self.max_body_bytes, self.max_rows)
            if problem:
                raise problem
        except Refused as exc:
            await send_error(send, exc.status, str(exc))
            return
        if body is None:  # the client went away
            return
        answer = _ErrorsAsJson(send)
        with request_scope() as abandoned:
            gone = asyncio.create_task(_disconnect(receive))
            # The watcher ends when the client goes, or is cancelled when the app has answered or
            # given up (a timeout): either way, work still running is for nobody.
            gone.add_done_callback(lambda _: abandoned.set())
            try:
                await self.app(scope, _replay(body, gone), answer.send)
            except Exception:
                log.exception("unhandled error answering %s %s", scope["method"], scope["path"])
                if not answer.forwarded:
                    await send_error(send, HTTPStatus.INTERNAL_SERVER_ERROR, "internal server error")
            finally:
                gone.cancel()

    async def _read_body(self, declared: str | None, receive: Receive) -> bytes | None:
        """The whole body within the body's deadline, or :class:`Refused` as soon as it passes the
        limit or the deadline; None on disconnect."""
        limit = f"the server's limit of {self.max_body_bytes:,} bytes"
        too_large = HTTPStatus.REQUEST_ENTITY_TOO_LARGE
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise Refused(too_large, f"Content-Length {int(declared):,} bytes is over {limit}")
        chunks: list[bytes] = []
        size = 0
        deadline = asyncio.get_running_loop().time() + self.body_timeout_s
        while True:
            try:
                message = await asyncio.wait_for(receive(), deadline - asyncio.get_running_loop().time())
            except TimeoutError:
                late = f"the request body did not arrive within {self.body_timeout_s:g} s"
                raise Refused(HTTPStatus.REQUEST_TIMEOUT, late) from None
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise Refused(too_large, f"request body over {limit}")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def _header(scope: MutableMapping[str, Any], name: bytes) -> str | None:
    """The first value of a request header (as Starlette's ``headers.get``, which MLflow reads)."""
    return next((v.decode("latin-1") for k, v in scope["headers"] if k.lower() == name), None)


async def _disconnect(receive: Receive) -> None:
    """Return when the client goes away (uvicorn also says so once the answer is complete)."""
    while (await receive())["type"] != "http.disconnect":
        pass


def _replay(body: bytes, gone: asyncio.Task[None]) -> Receive:
    """A ``receive`` that hands the app the body already read, then waits for the client to go:
    the guard's own watcher is the only reader of the client's events."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replay() -> Message:
        if pending:
            return pending.pop()
        await asyncio.shield(gone)
        return {"type": "http.disconnect"}

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


async def send_error(
    send: Send, status: int, message: str, retry_after: int | None = None, close: bool = False
) -> None:
    """Answer with our own JSON error (and ``Retry-After`` seconds where given; with ``close``, the
    server closes the connection after it)."""
    body = json.dumps({"error_code": status_name(status), "message": client_message(message)}).encode()
    await _send_json(send, status, body, retry_after, close)


async def _send_json(send: Send, status: int, body: bytes, retry_after: int | None = None, close: bool = False) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if retry_after is not None:
        headers.append((b"retry-after", str(retry_after).encode()))
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
