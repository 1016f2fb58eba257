"""Work nobody waits for stops: a request whose client went away, or that the app gave up on
(MLflow's request timeout), is marked abandoned, and the model stops at its next image or model.

The guard (:mod:`cnmc.serving.guard`) opens a :func:`request_scope` around each request and sets its
event; the model's worker thread sees the same event because ``asyncio.to_thread`` and Starlette's
threadpool copy the request's context into the thread. Outside a server nothing is ever abandoned.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

log = logging.getLogger(__name__)
_gone: ContextVar[threading.Event | None] = ContextVar("cnmc_request_gone", default=None)


class RequestAbandoned(Exception):
    """The client of this request is gone: its answer would be thrown away."""


@contextmanager
def request_scope() -> Iterator[threading.Event]:
    """An event that marks the request being answered in this context as abandoned once set."""
    event = threading.Event()
    token = _gone.set(event)
    try:
        yield event
    finally:
        _gone.reset(token)


def stop_if_abandoned(progress: str) -> None:
    """Raise :class:`RequestAbandoned` if nobody waits for this request's answer any more, and log
    how far the work got (``progress``, e.g. "after 3 of 64 images")."""
    event = _gone.get()
    if event is not None and event.is_set():
        log.info("stopped answering a request %s: the client went away or the request timed out", progress)
        raise RequestAbandoned(f"abandoned {progress}")
