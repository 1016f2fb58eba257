"""`cnmc serve` against clients an attacker would write, on loopback, every wait bounded: idle and
trickling connections are cut at the deadline, a half-sent body gets 408, connections and requests
past their caps get 503 with Retry-After, malformed HTTP gets the same JSON 400, bombs under the
byte limit are refused by what they decode to, work for clients that hung up stops, and an honest
client is served all along with the server's memory bounded.

The server serves the small model logged before the layout move, with small limits."""

from __future__ import annotations

import base64
import io
import json
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import local_server
from PIL import Image

pytestmark = pytest.mark.slow
MODEL = Path(__file__).parents[1] / "fixtures" / "pyfunc_before_layout_move"
TIMEOUT_S, MAX_CONNECTIONS, MAX_IN_FLIGHT = 2, 8, 2


class Server(NamedTuple):
    port: int
    pid: int
    log: Path


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A ``cnmc serve`` with a 2 s deadline, 8 connections, 2 requests in flight, 1 MiB bodies."""
    work, port = tmp_path_factory.mktemp("hostile"), local_server.free_port()
    flags = ("--timeout", str(TIMEOUT_S), "--max-connections", str(MAX_CONNECTIONS))
    flags += ("--max-in-flight", str(MAX_IN_FLIGHT), "--max-body-mb", "1")
    command = local_server.cnmc_serve(str(MODEL), port, *flags)
    proc = local_server.start(command, work, local_server.serving_env(None), work / "server.log")
    try:
        local_server.wait_until_up(f"http://127.0.0.1:{port}/ping", proc, work / "server.log")
        yield Server(port, proc.pid, work / "server.log")
    finally:
        local_server.stop(proc)


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def answer(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body of the one answer on ``sock`` (the server closes or says how long it is)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return 0, {}, data  # closed without an answer
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    while len(body) < int(headers.get("content-length", len(body))):
        body += sock.recv(65536)
    return int(lines[0].split()[1]), headers, body


def request(port: int, body: bytes, content_type: str = "application/json", path: str = "/invocations") -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
    head += f"Content-Length: {len(body)}\r\n\r\n"
    return head.encode() + body


def honest_body() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(buffer, "PNG")
    return json.dumps({"inputs": [base64.b64encode(buffer.getvalue()).decode()]}).encode()


def honest(port: int) -> int:
    with connect(port) as sock:
        sock.sendall(request(port, honest_body()))
        return answer(sock)[0]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def test_idle_and_trickling_clients_are_cut_at_the_deadline(server: Server) -> None:
    port = server.port
    idle, trickle = connect(port), connect(port)
    began = time.monotonic()
    for byte in b"POST /invocations HTTP/1.1\r\nHost: 127.0.0.1\r\n":  # a byte every 0.1 s, never the end
        try:
            trickle.sendall(bytes([byte]))
        except OSError:
            break
        time.sleep(0.1)
    for sock in (idle, trickle):
        status, _, body = answer(sock)
        assert status == 408 and b"did not arrive within 2 s" in body
        sock.close()
    assert time.monotonic() - began < TIMEOUT_S + 3


def test_a_half_sent_body_gets_408(server: Server) -> None:
    port = server.port
    with connect(port) as sock:
        sock.sendall(request(port, b'{"inputs": ["' + b"A" * 100)[:-50])  # Content-Length says 50 more
        status, _, body = answer(sock)
    assert status == 408 and json.loads(body)["error_code"] == "REQUEST_TIMEOUT"


def test_connections_and_requests_past_their_caps_get_503_with_retry_after(server: Server) -> None:
    port = server.port
    held = [connect(port) for _ in range(MAX_CONNECTIONS)]
    try:
        time.sleep(0.2)
        with connect(port) as extra:
            status, headers, body = answer(extra)
        assert status == 503 and headers["retry-after"] == "1" and json.loads(body)["error_code"]
    finally:
        for sock in held:
            sock.close()
    time.sleep(0.2)
    slow = [connect(port) for _ in range(MAX_IN_FLIGHT)]  # two requests in flight, their bodies unfinished
    try:
        for sock in slow:
            sock.sendall(request(port, honest_body())[:-10])
        time.sleep(0.3)
        with connect(port) as third:
            third.sendall(request(port, honest_body()))
            status, headers, body = answer(third)
        assert status == 503 and headers["retry-after"] == "1" and b"requests already" in body
    finally:
        for sock in slow:
            sock.close()


@pytest.mark.parametrize(
    ("name", "body", "content_type", "status", "words"),
    [
        ("deep JSON", b"[" * 100_000 + b"]" * 100_000, "application/json", 400, "nested deeper"),
        ("huge integer", b'{"inputs": [' + b"9" * 200_000 + b"]}", "application/json", 400, "not valid JSON"),
    ],
)
def test_bodies_that_would_crash_the_decoder_are_400(
    server: Server, name: str, body: bytes, content_type: str, status: int, words: str
) -> None:
    port = server.port
    with connect(port) as sock:
        sock.sendall(request(port, body, content_type))
        got, _, reply = answer(sock)
    assert got == status and words in json.loads(reply)["message"] and b"9999" not in reply, name


@pytest.mark.parametrize(
    "raw",
    [
        b"POST /invocations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: eleventy\r\n\r\n{}",
        b"POST /invocations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: -1\r\n\r\n{}",
        b"\x16\x03\x01\x00\xa5 not http at all\r\n\r\n",
    ],
    ids=["words for a length", "negative length", "TLS to a plain port"],
)
def test_malformed_http_gets_the_same_json_error(server: Server, raw: bytes) -> None:
    port = server.port
    with connect(port) as sock:
        sock.sendall(raw)
        status, headers, body = answer(sock)
    assert status == 400 and headers["content-type"] == "application/json"
    assert json.loads(body)["error_code"] == "BAD_REQUEST" and b"eleventy" not in body


def test_a_body_longer_than_its_content_length_is_one_answer_then_400(server: Server) -> None:
    port = server.port
    with connect(port) as sock:
        sock.sendall(request(port, honest_body()) + b"trailing bytes that are not a request\r\n\r\n")
        replies = b""
        while chunk := sock.recv(65536):  # the server answers twice, then closes
            replies += chunk
    assert re.findall(rb"HTTP/1\.1 (\d{3}) ", replies) == [b"200", b"400"]
    assert json.loads(replies.rpartition(b"\r\n\r\n")[2])["error_code"] == "BAD_REQUEST"


def test_both_content_length_and_transfer_encoding_is_refused_and_the_connection_closed(server: Server) -> None:
    """RFC 9112: the framing is ambiguous; a smuggled second request in the body must never be answered."""
    body = honest_body()
    smuggled = f"POST /invocations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n\r\n".encode()
    chunk = smuggled + body
    head = (
        "POST /invocations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n{len(chunk):x}\r\n"
    ).encode()
    with connect(server.port) as sock:
        sock.sendall(head + chunk + b"\r\n0\r\n\r\n")
        replies = b""
        while data := sock.recv(65536):  # one answer, then the server closes
            replies += data
    assert re.findall(rb"HTTP/1\.1 (\d{3}) ", replies) == [b"400"]
    assert b"both Content-Length and Transfer-Encoding" in replies and honest(server.port) == 200


def parquet(frame: pd.DataFrame) -> bytes:
    buffer = io.BytesIO()
    frame.to_parquet(buffer, compression="zstd")
    return buffer.getvalue()


def test_parquet_bombs_are_refused_by_what_they_decode_to_and_memory_stays_bounded(server: Server) -> None:
    port, pid = server.port, server.pid
    many_rows = parquet(pd.DataFrame({"image": ["A" * 1000] * 20_000}))  # 20 MB of rows once decoded
    huge_value = parquet(pd.DataFrame({"image": ["A" * 5_000_000] * 3}))  # 15 MB
    assert max(len(many_rows), len(huge_value)) < 100_000  # both far under the 1 MiB body limit
    before = rss_mib(pid)
    for bomb, words in ((many_rows, b"20000 images in one request"), (huge_value, b"decompresses to")) * 3:
        with connect(port) as sock:
            sock.sendall(request(port, bomb, "application/vnd.apache.parquet"))
            status, _, reply = answer(sock)
        assert status == 413 and words in reply
    assert rss_mib(pid) < before + 100
    assert honest(port) == 200


def varint(value: int, width: int = 0) -> bytes:
    """``value`` zigzag-encoded as Thrift's compact protocol writes an integer, padded to ``width``
    bytes with continuation bytes (a non-canonical form every reader accepts)."""
    n, out = value << 1, bytearray()
    while n >= 0x80 or len(out) + 1 < width:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def lying_footer(value: str) -> bytes:
    """One row holding ``value``, whose footer claims its row group and column hold 100 bytes."""
    buffer = io.BytesIO()
    pq.write_table(pa.table({"image": [value]}), buffer, compression="zstd", use_dictionary=False)
    body = buffer.getvalue()
    footer_length = int.from_bytes(body[-8:-4], "little")
    head, footer = body[: -8 - footer_length], body[-8 - footer_length : -8]
    meta = pq.ParquetFile(io.BytesIO(body)).metadata
    for true_size in {meta.row_group(0).total_byte_size, meta.row_group(0).column(0).total_uncompressed_size}:
        honest_bytes = varint(true_size)
        footer = footer.replace(honest_bytes, varint(100, width=len(honest_bytes)))
    lied = head + footer + len(footer).to_bytes(4, "little") + b"PAR1"
    assert pq.ParquetFile(io.BytesIO(lied)).metadata.row_group(0).total_byte_size == 100
    return lied


def test_a_parquet_footer_that_lies_and_a_dictionary_spread_over_its_rows_are_measured(server: Server) -> None:
    """The footer's sizes are a claim: the pages' own headers say what they decompress to; and one
    dictionary value of 900 kB in 60 rows is 54 MB once pandas spreads it (its footer says 900 kB)."""
    port, pid = server.port, server.pid
    footer_lie = lying_footer("A" * 3_000_000)
    spread = parquet(pd.DataFrame({"image": ["B" * 900_000] * 60}))
    assert max(len(footer_lie), len(spread)) < 10_000
    before = rss_mib(pid)
    for bomb in (footer_lie, spread) * 3:
        with connect(port) as sock:
            sock.sendall(request(port, bomb, "application/vnd.apache.parquet"))
            status, _, reply = answer(sock)
        assert status == 413 and b"decompresses to" in reply, reply
    assert rss_mib(pid) < before + 100
    assert honest(port) == 200


def test_work_for_a_client_that_went_away_stops(server: Server) -> None:
    """Two requests of 12 costly images (each 48 MB once decoded, ~0.5 s) fill both places in flight;
    their clients hang up, the decoding stops at the next image, and an honest request is served."""
    buffer = io.BytesIO()
    Image.new("RGB", (4000, 4000)).save(buffer, "PNG", optimize=True)
    costly = json.dumps({"inputs": [base64.b64encode(buffer.getvalue()).decode()] * 12}).encode()
    for _ in range(MAX_IN_FLIGHT):
        with connect(server.port) as sock:
            sock.sendall(request(server.port, costly))
            time.sleep(0.3)  # the server is decoding
    began = time.monotonic()
    pattern = re.compile(r"stopped answering a request after decoding (\d+) of 12 images")
    while len(stopped := pattern.findall(server.log.read_text())) < MAX_IN_FLIGHT and time.monotonic() - began < 20:
        time.sleep(0.1)
    # Each stopped within the first half of its images, not after all 12 (counted, not timed: a busy
    # machine decodes slower, and the client hung up 0.3 s in).
    assert len(stopped) == MAX_IN_FLIGHT and all(int(n) <= 6 for n in stopped), stopped
    assert honest(server.port) == 200


def test_an_honest_client_is_served_beside_slow_ones(server: Server) -> None:
    port = server.port
    slow = [connect(port) for _ in range(MAX_CONNECTIONS - 2)]
    try:
        for sock in slow:
            sock.sendall(b"POST /invocations HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # headers never finished
        assert [honest(port) for _ in range(3)] == [200, 200, 200]
    finally:
        for sock in slow:
            sock.close()


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ("Host: evil.example:5001\r\n", 403),  # a page whose name was rebound to 127.0.0.1
        ("Host: 127.0.0.1\r\nOrigin: http://evil.example\r\n", 403),  # another site's page posting here
        ("Host: 127.0.0.1\r\nOrigin: null\r\n", 403),  # a sandboxed frame or a file:// page
        ("Host: localhost:5001\r\nOrigin: http://localhost:5001\r\n", 200),  # our own page
        ("Host: 127.0.0.1\r\n", 200),  # curl, the README's examples
    ],
)
def test_only_our_names_and_our_own_pages_are_answered(server: Server, headers: str, status: int) -> None:
    body = honest_body()
    head = (
        f"POST /invocations HTTP/1.1\r\n{headers}Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    with connect(server.port) as sock:
        sock.sendall(head.encode() + body)
        code, _, reply = answer(sock)
    assert code == status, reply[:300]
    if status == 403:
        message = json.loads(reply)["message"]
        assert "not served here" in message or "cross-origin request" in message


def test_a_nul_in_a_string_is_named_not_dropped(server: Server) -> None:
    """numpy drops a trailing NUL from a string: alone it read as an empty image, after an image it
    went unnoticed. Any string holding one is refused, by name."""
    image = json.loads(honest_body())["inputs"][0]
    for body in (
        {"inputs": ["\u0000"]},
        {"inputs": [image + "\u0000"]},
        {"inputs": {"image": [image], "subject\u0000": ["a"]}},
    ):
        with connect(server.port) as sock:
            sock.sendall(request(server.port, json.dumps(body).encode()))
            status, _, reply = answer(sock)
        assert status == 400 and b"holds a NUL character" in reply, reply
    assert honest(server.port) == 200
