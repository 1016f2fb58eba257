"""What ``cnmc serve`` adds to MLflow's scoring app, against the session's real ``cnmc serve`` of
the tiny champion (``conftest.py``): small JSON errors with the right 4xx, the body and batch limits,
``GET /info``, a bounded load test, graceful SIGTERM (its own server), and the serving docs'
examples run as written with a real-size cell."""

from __future__ import annotations

import base64
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import mlflow
import numpy as np
import pandas as pd
import pytest
from helpers import local_server
from helpers.runs import Champion
from helpers.servers import SERVED_MAX_BATCH, SERVED_MAX_BODY_MB, Server
from helpers.synthetic_cells import synthetic_cell_bmp
from PIL import Image

from cnmc.serving.guard import MESSAGE_LIMIT

MIB = 1024 * 1024
SERVING_DOC = Path(__file__).resolve().parents[2] / "docs" / "serving.md"
REAL_CELLS = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "cnmc-real"
JSON = {"Content-Type": "application/json"}

pytestmark = pytest.mark.slow  # every test here talks to a server subprocess


@dataclass(frozen=True)
class Reply:
    status: int
    body: bytes

    def json(self) -> dict:
        return json.loads(self.body)


def connect(server: Server, timeout: float = 60) -> http.client.HTTPConnection:
    url = urlsplit(server.url)
    return http.client.HTTPConnection(url.hostname, url.port, timeout=timeout)


def call(
    server: Server,
    method: str,
    path: str,
    body: bytes | Iterator[bytes] | None = None,
    headers: dict[str, str] | None = None,
) -> Reply:
    """One request on a fresh connection; ``body`` as bytes (Content-Length) or chunks (chunked)."""
    connection = connect(server)
    try:
        chunked = body is not None and not isinstance(body, bytes)
        connection.request(method, path, body=body, headers=headers or {}, encode_chunked=chunked)
        response = connection.getresponse()
        return Reply(response.status, response.read())
    finally:
        connection.close()


def cell_bmp(size: int = 60, seed: int = 0) -> bytes:
    return synthetic_cell_bmp(size, seed)


def images_body(n: int, value: str | None = None) -> bytes:
    value = value or base64.b64encode(cell_bmp()).decode()
    return json.dumps({"inputs": [value] * n}).encode()


def assert_small_json_error(reply: Reply, status: int, error_code: str, quoting: bytes = b"") -> str:
    """The error is JSON ``{"error_code", "message"}`` with ``status``, a one-line message without a
    traceback, and at most 200 bytes of ``quoting`` (the request) in it; returns the message."""
    assert reply.status == status, reply.body[:500]
    assert len(reply.body) < 600, reply.body[:500]
    answer = reply.json()
    assert set(answer) == {"error_code", "message"} and answer["error_code"] == error_code, answer
    message = answer["message"]
    assert 0 < len(message) <= MESSAGE_LIMIT and "\n" not in message and "Traceback" not in message, message
    longest = max(
        (len(run) for run in re.findall(r"[A-Za-z0-9+/=]{20,}", message) if run in quoting.decode("latin-1")), default=0
    )
    assert longest <= 200, message
    return message


def assert_serving(server: Server) -> None:
    reply = call(server, "POST", "/invocations", images_body(1), JSON)
    assert reply.status == 200 and len(reply.json()["predictions"]) == 1, reply.body[:500]


# -- errors: JSON, the right 4xx, small ------------------------------------------------------------
def test_bad_requests_get_small_json_errors_with_the_right_status(cnmc_server: Server) -> None:
    good = images_body(1)
    junk = base64.b64encode(np.random.default_rng(0).bytes(3_750_000))  # 5 MB, not JSON
    cases = [
        ("no Content-Type", {}, good, 415, "UNSUPPORTED_MEDIA_TYPE", "missing Content-Type"),
        ("wrong type", {"Content-Type": "text/plain"}, good, 415, "UNSUPPORTED_MEDIA_TYPE", "'text/plain'"),
        (
            "wrong charset",
            {"Content-Type": "application/json; charset=latin-1"},
            good,
            415,
            "UNSUPPORTED_MEDIA_TYPE",
            "charset 'latin-1'",
        ),
        (
            "unknown parameter",
            {"Content-Type": "application/json; format=pandas-split"},
            good,
            415,
            "UNSUPPORTED_MEDIA_TYPE",
            "parameters 'format'",
        ),
        (
            "bad parquet",
            {"Content-Type": "application/vnd.apache.parquet"},
            b"PAR1 this is no parquet file",
            400,
            "BAD_REQUEST",
            "not a readable Parquet file",  # checked before MLflow decodes it
        ),
        ("5 MB not JSON", JSON, junk, 400, "BAD_REQUEST", "valid JSON"),
        ("5 MB not UTF-8", JSON, b"\xff\xfe" + junk, 400, "BAD_REQUEST", "valid JSON"),
    ]
    for name, headers, body, status, code, part in cases:
        reply = call(cnmc_server, "POST", "/invocations", body, headers)
        assert part in assert_small_json_error(reply, status, code, quoting=body), name
    assert_small_json_error(call(cnmc_server, "GET", "/nowhere"), 404, "NOT_FOUND")
    assert_small_json_error(call(cnmc_server, "GET", "/invocations"), 405, "METHOD_NOT_ALLOWED")
    assert_serving(cnmc_server)


def test_model_errors_keep_their_message_and_lose_the_echo(cnmc_server: Server) -> None:
    big = base64.b64encode(cell_bmp(size=450)).decode()
    reply = call(cnmc_server, "POST", "/invocations", json.dumps({"inputs": [big, "%%%"]}).encode(), JSON)
    message = assert_small_json_error(reply, 400, "INVALID_PARAMETER_VALUE", quoting=big.encode())
    assert message == "row 1: 'image' is not valid base64"


# -- limits -----------------------------------------------------------------------------------------
def test_a_body_over_the_limit_is_refused_while_it_is_read(cnmc_server: Server) -> None:
    limit = int(SERVED_MAX_BODY_MB * MIB)
    too_big = b"x" * (limit + 1)

    # Announced: refused from the headers alone, the body never sent.
    connection = connect(cnmc_server, timeout=30)
    connection.putrequest("POST", "/invocations")
    connection.putheader("Content-Type", "application/json")
    connection.putheader("Content-Length", str(10 * limit))
    connection.endheaders()
    response = connection.getresponse()
    assert_small_json_error(Reply(response.status, response.read()), 413, "REQUEST_ENTITY_TOO_LARGE")
    connection.close()

    # Sent whole with its length, and chunked without one: refused once the limit is passed.
    reply = call(cnmc_server, "POST", "/invocations", too_big, JSON)
    assert "over the server's limit" in assert_small_json_error(reply, 413, "REQUEST_ENTITY_TOO_LARGE")
    chunks = (too_big[i : i + MIB] for i in range(0, len(too_big), MIB))
    reply = call(cnmc_server, "POST", "/invocations", chunks, JSON)
    assert "request body over" in assert_small_json_error(reply, 413, "REQUEST_ENTITY_TOO_LARGE")
    assert_serving(cnmc_server)


def test_more_images_than_the_batch_limit_are_refused_before_decoding(cnmc_server: Server) -> None:
    n = SERVED_MAX_BATCH + 1
    value = base64.b64encode(cell_bmp()).decode()
    frame = pd.DataFrame({"image": ["%%% not even base64"] * n})
    requests = {
        "inputs": (images_body(n, value), "application/json"),
        "dataframe_split": (
            json.dumps({"dataframe_split": {"columns": ["image"], "data": [[value]] * n}}).encode(),
            "application/json",
        ),
        "undecodable values": (images_body(n, "%%% not even base64"), "application/json"),  # counted, not decoded
        "parquet": (frame.to_parquet(), "application/vnd.apache.parquet"),
    }
    for name, (body, content_type) in requests.items():
        reply = call(cnmc_server, "POST", "/invocations", body, {"Content-Type": content_type})
        message = assert_small_json_error(reply, 413, "REQUEST_ENTITY_TOO_LARGE")
        assert f"{n} images in one request" in message and f"at most {SERVED_MAX_BATCH}" in message, name
    reply = call(cnmc_server, "POST", "/invocations", images_body(SERVED_MAX_BATCH, value), JSON)
    assert reply.status == 200 and len(reply.json()["predictions"]) == SERVED_MAX_BATCH


# -- one patient ------------------------------------------------------------------------------------
def test_a_patient_request_answers_every_cell_and_calls_the_person(cnmc_server: Server) -> None:
    images = [base64.b64encode(cell_bmp(seed=k)).decode() for k in range(5)]
    images.insert(2, base64.b64encode(b"not an image").decode())
    images.append("%%% not base64 %%%")
    names = [f"c{k}.bmp" for k in range(len(images))]
    body = json.dumps({"images": images, "names": names, "subject": "P1"}).encode()
    reply = call(cnmc_server, "POST", "/patient", body, JSON)
    assert reply.status == 200, reply.body
    answer = reply.json()
    cells, patient = answer["cells"], answer["patient"]
    assert [c["name"] for c in cells] == names  # request order, bad ones in place
    assert cells[2]["error"] and "base64" in cells[-1]["error"] and cells[2]["prob_all"] is None
    good = [c for c in cells if c["error"] is None]
    assert len(good) == 5 and all(c["label"] in ("all", "hem") and 0 <= c["prob_all"] <= 1 for c in good)
    assert patient["subject"] == "P1" and (patient["cells"], patient["unreadable"]) == (5, 2)
    assert patient["mean_prob_all"] == pytest.approx(np.mean([c["prob_all"] for c in good]))
    assert patient["call"] == ("all" if patient["mean_prob_all"] >= cnmc_server.threshold else "hem")
    assert patient["ci95_low"] <= patient["mean_prob_all"] <= patient["ci95_high"]

    # Cells MLflow's protocol scores give the same p(ALL): one inference path.
    scored = call(cnmc_server, "POST", "/invocations", json.dumps({"inputs": {"image": images[:2]}}).encode(), JSON)
    assert [p["prob_all"] for p in scored.json()["predictions"]] == pytest.approx([c["prob_all"] for c in cells[:2]])


@pytest.mark.parametrize(
    ("body", "headers", "status", "words"),
    [
        (b"{not json", JSON, 400, "not valid JSON"),
        (b'{"pictures": []}', JSON, 400, '"images"'),
        (b'{"images": []}', JSON, 400, "at least one cell"),
        (b'{"images": [1, 2]}', JSON, 400, "base64 string"),
        (b'{"images": ["eA=="], "names": ["a", "b"]}', JSON, 400, "one name per image"),
        (json.dumps({"images": ["eA=="] * (SERVED_MAX_BATCH + 1)}).encode(), JSON, 413, "at most"),
        (b'{"images": ["eA=="]}', {"Content-Type": "text/plain"}, 415, "application/json"),
    ],
)
def test_bad_patient_requests_get_one_line_json_errors(
    cnmc_server: Server, body: bytes, headers: dict[str, str], status: int, words: str
) -> None:
    reply = call(cnmc_server, "POST", "/patient", body, headers)
    assert reply.status == status
    error = reply.json()
    assert set(error) == {"error_code", "message"} and words in error["message"] and "\n" not in error["message"]


def test_the_page_is_one_offline_file(cnmc_server: Server) -> None:
    reply = call(cnmc_server, "GET", "/")
    page = reply.body.decode()
    assert reply.status == 200 and '<input id="files" type="file" multiple' in page
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)  # nothing fetched from elsewhere


# -- what is served ---------------------------------------------------------------------------------
def test_info_names_the_registered_version_its_run_and_the_model(cnmc_server: Server, champion: Champion) -> None:
    reply = call(cnmc_server, "GET", "/info")
    assert reply.status == 200
    facts = reply.json()
    assert {"GET /", "POST /patient", "POST /invocations", "GET /info"} == set(facts.pop("routes"))
    assert facts == {
        "model_uri": champion.model_uri,
        "registered_model": champion.name,
        "version": champion.version,
        "run_id": champion.run_id,
        "backbone": champion.backbone,
        "image_size": 32,
        "threshold": pytest.approx(champion.threshold),
        "temperature": pytest.approx(champion.temperature),
        "tta": False,  # the tiny champion's validation did not choose TTA
        "data_hash": champion.data_hash,
        "max_batch": SERVED_MAX_BATCH,
        "max_body_bytes": int(SERVED_MAX_BODY_MB * MIB),
        "max_connections": 64,
        "max_in_flight": 8,
        "timeout_s": 30.0,
        "keep_alive_s": 5,
        "allowed_hosts": ["127.0.0.1", "::1", "localhost"],  # the names it answers (cnmc serve --allowed-host adds)
        "patient_min_cells": 5,
    }
    for path in ("/ping", "/health"):
        assert call(cnmc_server, "GET", path).status == 200
    assert call(cnmc_server, "GET", "/version").body.decode() == mlflow.__version__


# -- load ---------------------------------------------------------------------------------------------
def test_bounded_load_has_no_errors(
    cnmc_server: Server, record_property: Callable[[str, object], None], capsys: pytest.CaptureFixture[str]
) -> None:
    """4 clients x 200 requests (one cell each, keep-alive connections): every answer a 200."""
    clients, per_client = 4, 200
    body = json.dumps(
        {"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(cell_bmp()).decode()]]}}
    ).encode()
    result = local_server.load_test(urlsplit(cnmc_server.url).port, body, clients, per_client)
    ms, errors, wall = result.ms, result.errors, result.wall
    p50, p95 = np.percentile(ms, [50, 95])
    record_property("load_p95_ms", round(float(p95), 1))
    line = (
        f"cnmc serve load: {len(ms)} requests from {clients} clients in {wall:.1f} s, "
        f"p50 {p50:.1f} ms, p95 {p95:.1f} ms, errors {len(errors)}"
    )
    with capsys.disabled():
        print(f"\n{line}")
    assert not errors, (line, errors[:5])
    assert len(ms) == clients * per_client


# -- SIGTERM ------------------------------------------------------------------------------------------
def test_sigterm_lets_the_request_in_flight_finish_then_exits_0(champion: Champion, tmp_path: Path) -> None:
    """The request has sent its headers and half its body when SIGTERM comes; the rest follows."""
    port = local_server.free_port()
    log = tmp_path / "server.log"
    proc = local_server.start(
        local_server.cnmc_serve(champion.model_uri, port),
        tmp_path,
        local_server.serving_env(champion.tracking_uri),
        log,
    )
    try:
        local_server.wait_until_up(f"http://127.0.0.1:{port}/ping", proc, log)
        body = images_body(2)
        head = (
            f"POST /invocations HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
            sock.sendall(head + body[: len(body) // 2])
            time.sleep(1.0)  # the server has the request
            os.kill(proc.pid, signal.SIGTERM)
            time.sleep(1.0)  # and is shutting down
            assert proc.poll() is None, "exited with a request in flight"
            sock.sendall(body[len(body) // 2 :])
            answer = sock.makefile("rb").read()  # the server closes the connection after answering
        status_line, _, rest = answer.partition(b"\r\n")
        assert status_line == b"HTTP/1.1 200 OK", answer[:500]
        assert len(json.loads(rest.partition(b"\r\n\r\n")[2])["predictions"]) == 2
        assert proc.wait(timeout=60) == 0, log.read_text()[-2000:]
    finally:
        local_server.stop(proc)
    assert "Shutting down" in log.read_text()


# -- the serving docs' examples --------------------------------------------------------------------------
def serving_examples() -> list[tuple[str, str]]:
    """(language, code) of the blocks marked ``<!-- serving-example -->`` in the serving docs' first section."""
    section = re.split(r"\n##+ ", SERVING_DOC.read_text(), maxsplit=1)[0]
    return re.findall(r"<!-- serving-example -->\n```(bash|python)\n(.*?)```", section, flags=re.S)


def real_size_cell(path: Path) -> None:
    """A 450x450 BMP at ``path``: a real C-NMC cell (``../shared/data/cnmc-real``) if there, else a synthetic one."""
    real = next(REAL_CELLS.rglob("*.png"), None) if REAL_CELLS.is_dir() else None
    if real is not None:
        Image.open(real).convert("RGB").save(path, format="BMP")
    else:
        path.write_bytes(cell_bmp(size=450))


def test_the_serving_docs_examples_work_as_written_on_a_real_size_cell(cnmc_server: Server, tmp_path: Path) -> None:
    examples = serving_examples()
    assert len(examples) >= 3 and {lang for lang, _ in examples} == {"bash", "python"}, examples
    real_size_cell(tmp_path / "cell.bmp")
    assert len(base64.b64encode((tmp_path / "cell.bmp").read_bytes())) > 128 * 1024  # over one argument's limit
    for lang, code in examples:
        code = code.replace("127.0.0.1:5001", urlsplit(cnmc_server.url).netloc)
        command = ["bash", "-c", code] if lang == "bash" else [sys.executable, "-c", code]
        done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, (code, done.stderr[-2000:])
        assert re.search(r"label|run_id", done.stdout) and "error_code" not in done.stdout, (code, done.stdout[:500])
