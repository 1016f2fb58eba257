"""cnmc.serving.guard in process, on toy ASGI apps (fast): good answers pass byte for byte, error
answers and exceptions become small JSON, MLflow's echoes are cut out of messages, work the app
gave up on stops."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest

from cnmc.serving.abandoned import RequestAbandoned, request_scope, stop_if_abandoned
from cnmc.serving.guard import MESSAGE_LIMIT, HttpGuard, client_message, content_type_problem


def run(
    app: Any,
    body: bytes = b"{}",
    path: str = "/invocations",
    headers: tuple[tuple[bytes, bytes], ...] = ((b"content-type", b"application/json"),),
    client_waits: bool = False,
) -> list[dict]:
    """The messages ``HttpGuard(app)`` sends for one POST of ``body``; the client hangs up once it
    has sent it, or (``client_waits``) stays for as long as the guard runs."""
    sent: list[dict] = []
    events = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict:
        if events:
            return events.pop(0)
        if client_waits:
            await asyncio.Event().wait()  # never set
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": path, "headers": list(headers)}
    asyncio.run(HttpGuard(app, max_body_bytes=1000)(scope, receive, send))
    return sent


def answering(status: int, body: bytes, content_type: bytes = b"application/json") -> Any:
    async def app(scope: dict, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", content_type)]})
        await send({"type": "http.response.body", "body": body})

    return app


def test_good_answers_pass_untouched() -> None:
    sent = run(answering(200, b'{"predictions": []}'))
    assert sent[0]["headers"] == [(b"content-type", b"application/json")]
    assert sent[1]["body"] == b'{"predictions": []}'


def test_error_answers_and_exceptions_become_small_json() -> None:
    async def raising(scope: dict, receive: Any, send: Any) -> None:
        raise RuntimeError("model exploded")

    cases = [
        (answering(415, b"The scoring server only supports UTF-8", b"text/plain"), 415, "UNSUPPORTED_MEDIA_TYPE"),
        (answering(404, b'{"detail":"Not Found"}'), 404, "NOT_FOUND"),
        (answering(504, b"Request processing time exceeded limit"), 504, "GATEWAY_TIMEOUT"),
        (
            answering(
                400,
                json.dumps(
                    {"error_code": "BAD_REQUEST", "message": "bad\nthing", "stack_trace": "Traceback ..."}
                ).encode(),
            ),
            400,
            "BAD_REQUEST",
        ),
        (raising, 500, "INTERNAL_SERVER_ERROR"),
    ]
    for app, status, code in cases:
        start, body = run(app)
        assert start["status"] == status
        answer = json.loads(body["body"])
        assert set(answer) == {"error_code", "message"} and answer["error_code"] == code
        assert "\n" not in answer["message"] and "model exploded" not in answer["message"]


def test_bodies_over_the_limit_never_reach_the_app() -> None:
    async def never(scope: dict, receive: Any, send: Any) -> None:
        raise AssertionError("the app was called")

    start, body = run(never, body=b"x" * 1001)
    assert start["status"] == 413 and json.loads(body["body"])["error_code"] == "REQUEST_ENTITY_TOO_LARGE"
    start, _ = run(never, headers=((b"content-type", b"application/json"), (b"content-length", b"5000")))
    assert start["status"] == 413


def test_messages_lose_mlflows_echoes_and_stay_short() -> None:
    data = "A" * 100_000
    echo = f"Failed to predict data '{{'image': array(['{data}'])}}'. \nError: row 0: bad"
    assert client_message(echo) == "row 0: bad"
    schema = f"Failed to enforce schema of data '   image\n0  {data}' with schema '['image': string]'. Error: no str"
    assert client_message(schema) == "no str"  # MLflow's schema enforcement quotes the whole request
    assert client_message(f"Ensure that input is a valid JSON formatted string.\nInput: \n{data}\n") == (
        "Ensure that input is a valid JSON formatted string."
    )
    long = client_message("start " + data + " the end")
    assert len(long) == MESSAGE_LIMIT and long.startswith("start A") and long.endswith("A the end")


def test_content_types_follow_mlflows_rules() -> None:
    for accepted in (
        "application/json",
        "application/json; charset=UTF-8",
        "text/csv",
        "application/vnd.apache.parquet",
    ):
        assert content_type_problem(accepted) is None, accepted
    for refused in (
        None,
        "",
        "text/plain",
        "Application/JSON",
        "application/json; charset=latin-1",
        "application/json; format=pandas-split",
    ):
        assert content_type_problem(refused), refused


def test_work_the_app_gave_up_on_stops_though_the_client_waits() -> None:
    """MLflow's request timeout answers 504 but leaves its worker thread running: the guard marks
    the request abandoned, and the thread stops at its next check."""
    outcome: list[str] = []

    def work() -> None:
        try:
            for step in range(500):
                stop_if_abandoned(f"after {step} steps")
                time.sleep(0.01)
            outcome.append("finished")
        except RequestAbandoned as exc:
            outcome.append(str(exc))

    async def timing_out(scope: dict, receive: Any, send: Any) -> None:
        await receive()
        worker = asyncio.ensure_future(asyncio.to_thread(work))
        await asyncio.wait([worker], timeout=0.2)  # as MLflow's middleware gives up on call_next
        await send({"type": "http.response.start", "status": 504, "headers": []})
        await send({"type": "http.response.body", "body": b"Request processing time exceeded limit"})

    began = time.monotonic()
    run(timing_out, client_waits=True)  # asyncio.run waits for the worker thread as it shuts down
    assert outcome and outcome[0].startswith("abandoned after") and time.monotonic() - began < 2


def test_outside_a_server_nothing_is_abandoned() -> None:
    stop_if_abandoned("after 0 images")  # no request scope: batch prediction and mlflow's own server
    with request_scope() as abandoned:
        stop_if_abandoned("after 0 images")
        abandoned.set()
        with pytest.raises(RequestAbandoned, match="abandoned after 1 images"):
            stop_if_abandoned("after 1 images")
