"""The champion served for tests (:class:`Server`, :func:`run_server`, the limits of the session's
``cnmc serve``) and requests to a served model (:func:`cells`, :func:`post`)."""

from __future__ import annotations

import base64
import io
import json
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from helpers import local_server
from helpers.runs import Champion

if TYPE_CHECKING:  # pandas, numpy and PIL load when a test makes a request, not with conftest.py
    import pandas as pd

# The limits of the session's `cnmc serve` (small, so that the tests of them send little).
SERVED_MAX_BATCH = 8
SERVED_MAX_BODY_MB = 8


@dataclass(frozen=True)
class Server:
    """A model server subprocess serving the champion: base URL, the champion's threshold, its log."""

    url: str
    threshold: float
    log: Path


def run_server(command: Callable[[str, int], list[str]], champion: Champion, work: Path) -> Iterator[Server]:
    """Start ``command(model_uri, port)`` for the champion on a free port; stop it afterwards."""
    port = local_server.free_port()
    log = work / "server.log"
    proc = local_server.start(
        command(champion.model_uri, port), work, local_server.serving_env(champion.tracking_uri), log
    )
    try:
        url = f"http://127.0.0.1:{port}"
        local_server.wait_until_up(f"{url}/ping", proc, log)
        yield Server(url, champion.threshold, log)
    finally:
        local_server.stop(proc)


def cells(n: int = 4) -> pd.DataFrame:
    """``n`` small seeded PNG cells (40 px, base64) in an ``image`` column: a request's frame."""
    import numpy as np
    import pandas as pd
    from PIL import Image

    rng = np.random.default_rng(0)
    images = []
    for _ in range(n):
        pixels = np.zeros((40, 40, 3), dtype=np.uint8)
        pixels[8:32, 8:32] = rng.integers(60, 220, size=(24, 24, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        images.append(base64.b64encode(buffer.getvalue()).decode())
    return pd.DataFrame({"image": images})


def post(url: str, frame: pd.DataFrame) -> list[dict]:
    """``frame`` as ``dataframe_split`` to ``url``'s ``/invocations``; the predictions."""
    body = json.dumps({"dataframe_split": frame.to_dict(orient="split", index=False)}).encode()
    request = urllib.request.Request(f"{url}/invocations", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())["predictions"]
