"""A model logged before the package layout (when ``cnmc.serving`` was one module, and its pickle
names ``cnmc.serving.LeukemiaClassifier``) still loads and serves with today's code.

``fixtures/pyfunc_before_layout_move`` is such a model as MLflow logged it (a random-weight
``test_resnet`` at 32 px, threshold 0.5): its pickle, artifacts and bundled code, untouched.
"""

from __future__ import annotations

import io
import json
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnmc.inference.schema import CELL_COLUMNS
from cnmc.serving.pyfunc import LeukemiaClassifier, encode_file
from cnmc.serving.scoring import load_image_model, score_images

LOGGED_BEFORE_THE_MOVE = Path(__file__).parents[1] / "fixtures" / "pyfunc_before_layout_move"


def png_bytes(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_the_fixture_is_a_model_of_the_old_layout() -> None:
    pickled = (LOGGED_BEFORE_THE_MOVE / "python_model.pkl").read_bytes()
    assert b"cnmc.serving\x94" in pickled and b"LeukemiaClassifier" in pickled and b"pyfunc" not in pickled
    assert (LOGGED_BEFORE_THE_MOVE / "code" / "cnmc" / "serving.py").is_file()


def test_it_loads_and_answers_through_the_servers_loader() -> None:
    model = load_image_model(str(LOGGED_BEFORE_THE_MOVE))  # what cnmc serve and cnmc predict load with
    assert isinstance(model.unwrap_python_model(), LeukemiaClassifier)
    answers = score_images(model, [png_bytes(0), png_bytes(1), b"not an image"])
    for answer in answers[:2]:
        assert list(answer) == CELL_COLUMNS and 0.0 <= answer["prob_all"] <= 1.0 and answer["threshold"] == 0.5
        assert answer["label"] == ("all" if answer["prob_all"] >= 0.5 else "hem")
    assert list(answers[2]) == ["error"]


@pytest.mark.slow
def test_cnmc_serve_serves_it(tmp_path: Path) -> None:
    from helpers import local_server

    port = local_server.free_port()
    log = tmp_path / "server.log"
    proc = local_server.start(
        local_server.cnmc_serve(str(LOGGED_BEFORE_THE_MOVE), port), tmp_path, local_server.serving_env(None), log
    )
    try:
        url = f"http://127.0.0.1:{port}"
        local_server.wait_until_up(f"{url}/ping", proc, log)
        (tmp_path / "cell.png").write_bytes(png_bytes(2))
        body = json.dumps({"dataframe_records": [{"image": encode_file(tmp_path / "cell.png")}]}).encode()
        request = urllib.request.Request(f"{url}/invocations", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as reply:
            [row] = json.loads(reply.read())["predictions"]
        assert list(row) == CELL_COLUMNS and row["threshold"] == 0.5
    finally:
        local_server.stop(proc)
