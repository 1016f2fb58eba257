"""Connection limits uvicorn lacks, in its own HTTP/1.1 protocol class: a request's headers must
arrive within a deadline (a client that trickles them a byte at a time, or sends nothing, is cut
off), a connection beyond the cap is answered ``503`` with ``Retry-After`` at once, so that
slow or idle clients cannot hold every socket the process may open, and a request that is not
HTTP/1.1 (a malformed ``Content-Length``, a body longer than it says) gets the JSON error every
other answer uses.

Idle keep-alive connections are uvicorn's ``timeout_keep_alive``; the body's deadline and the cap
on requests in flight are the guard's (:mod:`cnmc.serving.guard`), which sees the request.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol


def raw_error(status: int, reason: str, message: str, retry_after: int | None = None) -> bytes:
    """A whole HTTP/1.1 error answer that closes the connection, as bytes for the transport."""
    body = json.dumps({"error_code": reason.upper().replace(" ", "_"), "message": message}).encode()
    head = [
        f"HTTP/1.1 {status} {reason}",
        "content-type: application/json",
        f"content-length: {len(body)}",
        "connection: close",
        *([f"retry-after: {retry_after}"] if retry_after is not None else []),
    ]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def limited_protocol(max_connections: int, header_timeout_s: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol with a connection cap and a deadline for each request's headers."""
    busy = raw_error(503, "Service Unavailable", f"the server holds {max_connections} connections", retry_after=1)
    slow = raw_error(408, "Request Timeout", f"the request's headers did not arrive within {header_timeout_s:g} s")
    malformed = raw_error(
        400, "Bad Request", "the request is not valid HTTP/1.1 (request line, headers or Content-Length)"
    )

    class LimitedH11Protocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                transport.write(busy)
                transport.close()
                return
            self._wait_for_headers()

        def handle_events(self) -> None:
            cycle = self.cycle
            super().handle_events()
            if self.cycle is not cycle:  # a request's headers are in: the body's deadline is the guard's
                self._stop_waiting()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            idle = self.cycle is None or self.cycle.response_complete  # no pipelined request under way
            if idle and not self.transport.is_closing():
                self._wait_for_headers()  # of the next request on this connection

        def send_400_response(self, msg: str) -> None:
            """The same JSON error as every other answer, not uvicorn's plain text."""
            self.transport.write(malformed)
            self.transport.close()

        def connection_lost(self, exc: Exception | None) -> None:
            self._stop_waiting()
            super().connection_lost(exc)

        def _wait_for_headers(self) -> None:
            self._stop_waiting()
            self._header_timer = self.loop.call_later(header_timeout_s, self._headers_too_slow)

        def _stop_waiting(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            if not self.transport.is_closing():
                self.transport.write(slow)
                self.transport.close()

    return LimitedH11Protocol
