"""The served model over HTTP: real ``mlflow models serve`` and ``cnmc serve`` processes (one of each
a session, ``conftest.py``) for the tiny champion take base64 image bytes as ``dataframe_split``,
``dataframe_records`` or ``inputs``, answer every bad input with a 4xx JSON message naming the
problem (never a stack trace), then go on serving; on good requests ``cnmc serve`` answers byte for
byte what ``mlflow models serve`` answers. The decode path behind those messages is also checked in
process (fast). What only ``cnmc serve`` does is in ``test_http_server.py``."""

from __future__ import annotations

import base64
import builtins
import io
import json
import os
import pickle
import re
import struct
import urllib.error
import urllib.request
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from helpers.servers import Server
from mlflow.exceptions import MlflowException
from PIL import Image

from cnmc.data.images import MAX_PIXELS
from cnmc.inference.schema import CELL_COLUMNS
from cnmc.inference.spec import ModelSpec
from cnmc.serving.pyfunc import InvalidInput, LeukemiaClassifier, Member, decode_base64_images

BACKBONE = "test_resnet"


# -- images, good and bad -------------------------------------------------------------------------
def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def cell_image(seed: int = 0, size: int = 60) -> Image.Image:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    pixels[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = (200, 60, 160)
    return Image.fromarray(pixels)


def png_header_bomb(width: int, height: int, bit_depth: int = 1, color_type: int = 0) -> bytes:
    """A valid PNG of ``width`` x ``height`` all-zero pixels: 20000x20000 1-bit is ~50 KB of bytes
    but 400 million pixels (1.2 GB as RGB) once decoded."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\0" * (1 + (width * bit_depth + 7) // 8)  # filter byte + packed pixels
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    palette = chunk(b"PLTE", b"\0\0\0\xff\xff\xff") if color_type == 3 else b""
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + palette + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


class _Exploit:
    """Unpickling this would write a marker file: proof that nothing unpickles request bytes."""

    marker = ""

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path(self.marker).write_text, ("unpickled",))


@pytest.fixture(scope="module")
def good_bmp() -> bytes:
    return encoded(cell_image(), "BMP")


@pytest.fixture(scope="module")
def bomb_png() -> bytes:
    return png_header_bomb(20000, 20000)


def bad_values(good: bytes, bomb: bytes, marker: Path) -> dict[str, tuple[Any, str]]:
    """name -> (value in the ``image`` column, part of the message that names the problem)."""
    exploit = _Exploit()
    exploit.marker = str(marker)
    return {
        "not-base64": ("%%% not base64 %%%", "is not valid base64"),
        "non-image": (b64(b"just some text, no image at all"), "not an image"),
        "empty": ("", "is empty"),
        "truncated": (b64(good[: len(good) // 2]), "corrupt or truncated"),
        "huge-dimensions": (b64(bomb), "too large"),
        "file-path": ("/etc/passwd", "is not valid base64"),
        "pickle": (b64(pickle.dumps(exploit)), "not an image"),
        "integer": (5, "must be a base64 string, got int"),
        "null": (None, "is missing (null)"),
    }


# -- in process: the decode path and the pyfunc's error mapping (fast) ---------------------------
@pytest.fixture(scope="module")
def classifier() -> LeukemiaClassifier:
    """The pyfunc class with a random tiny model, without MLflow's load."""
    from cnmc.models.backbones import create_backbone

    net = create_backbone(BACKBONE, pretrained=False)
    pyfunc = LeukemiaClassifier()
    pyfunc.member = Member(net.model.eval(), ModelSpec(BACKBONE, 32, net.mean, net.std, threshold=0.4))
    return pyfunc


def test_decode_accepts_every_format_and_base64_style(good_bmp: bytes) -> None:
    image = cell_image()
    formats = [encoded(image, fmt) for fmt in ("BMP", "PNG", "TIFF", "JPEG")]
    values = [b64(data) for data in formats] + [
        "data:image/png;base64," + b64(formats[1]),  # a browser's data URL
        base64.encodebytes(formats[0]).decode(),  # line-wrapped, as `base64 file` prints
        formats[2],  # raw bytes (in-process callers)
    ]
    batch = decode_base64_images(values, 32)
    assert batch.shape == (7, 32, 32, 3) and batch.dtype == np.uint8
    for lossless in (1, 2, 4, 5, 6):
        np.testing.assert_array_equal(batch[lossless], batch[0])
    assert np.abs(batch[3].astype(int) - batch[0].astype(int)).mean() < 20  # JPEG


def test_decode_refuses_each_bad_input_naming_row_and_problem(good_bmp: bytes, bomb_png: bytes, tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"
    for name, (value, message) in bad_values(good_bmp, bomb_png, marker).items():
        with pytest.raises(InvalidInput, match=re.escape(message)) as info:
            decode_base64_images([b64(good_bmp), value], 32)
        assert str(info.value).startswith("row 1: "), name
    assert not marker.exists()


@pytest.mark.parametrize("size", [(20000, 20000, 1, 0), (8000, 8000, 8, 3), (9500, 9500, 8, 3)])
def test_huge_dimensions_are_refused_before_any_pixel_is_decoded(
    size: tuple[int, int, int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Above MAX_PIXELS (our check), above Pillow's bomb warning and above its bomb error: all
    refused from the header alone, and Pillow's DecompressionBomb* become a plain 'too large'."""
    from PIL import ImageFile

    width, height, depth, color = size
    assert width * height > MAX_PIXELS
    data = png_header_bomb(width, height, depth, color)
    assert len(data) < 200_000

    def never(self: Any) -> None:
        raise AssertionError("pixels decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", never)
    with pytest.raises(InvalidInput, match=r"^row 0: too large \("):
        decode_base64_images([b64(data)], 32)


def test_truncated_images_of_every_format_are_refused() -> None:
    image = cell_image(size=120)
    for fmt in ("BMP", "PNG", "JPEG", "TIFF"):
        data = encoded(image, fmt)
        with pytest.raises(InvalidInput, match="corrupt or truncated|not an image"):
            decode_base64_images([b64(data[: len(data) // 2])], 32)


def test_a_string_is_never_opened_as_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = tmp_path / "cell.png"
    cell_image().save(real)
    opened: list[str] = []
    for module, name in ((builtins, "open"), (io, "open"), (os, "open")):
        original = getattr(module, name)

        def spy(file: Any, *args: Any, _original: Any = original, **kwargs: Any) -> Any:
            opened.append(str(file))
            return _original(file, *args, **kwargs)

        monkeypatch.setattr(module, name, spy)
    for value in ("/etc/passwd", str(real), f"file://{real}", "AAAA" + str(real).replace("/", "")):
        with pytest.raises(InvalidInput):
            decode_base64_images([value], 32)
    assert not any("passwd" in f or "cell.png" in f for f in opened), opened


def test_too_many_bytes_are_refused_before_decoding(monkeypatch: pytest.MonkeyPatch, good_bmp: bytes) -> None:
    import cnmc.serving.pyfunc

    monkeypatch.setattr(cnmc.serving.pyfunc, "MAX_IMAGE_BYTES", 1000)
    with pytest.raises(InvalidInput, match="too large"):
        decode_base64_images([b64(good_bmp)], 32)
    with pytest.raises(InvalidInput, match="too large"):
        decode_base64_images([good_bmp], 32)


def test_pyfunc_maps_bad_input_to_invalid_parameter_value(classifier: LeukemiaClassifier, good_bmp: bytes) -> None:
    out = classifier.predict(None, pd.DataFrame({"image": [b64(good_bmp)] * 2}))
    assert list(out.columns) == CELL_COLUMNS
    assert (out["threshold"] == 0.4).all() and out["prob_all"].between(0, 1).all()
    for model_input, message in [
        (pd.DataFrame({"image": [b64(good_bmp), "%%%"]}), "row 1: 'image' is not valid base64"),
        (pd.DataFrame({"other": [b64(good_bmp)]}), "missing column 'image'"),
        (pd.DataFrame({"image": []}), "no images"),
        ({"image": np.array([b64(b"text")])}, "row 0: not an image"),
    ]:
        with pytest.raises(MlflowException, match=message) as info:
            classifier.predict(None, model_input)
        assert info.value.error_code == "INVALID_PARAMETER_VALUE"
        assert info.value.get_http_status_code() == 400


def test_unexpected_decode_errors_become_invalid_input(monkeypatch: pytest.MonkeyPatch, good_bmp: bytes) -> None:
    import cnmc.serving.pyfunc

    def broken(data: bytes) -> np.ndarray:
        raise RuntimeError("resize exploded")

    monkeypatch.setattr(cnmc.serving.pyfunc, "decode_cell", broken)
    with pytest.raises(InvalidInput, match=r"row 0: could not decode the image \(RuntimeError: resize exploded\)"):
        decode_base64_images([b64(good_bmp)], 32)


# -- over HTTP: the same contract from `mlflow models serve` and `cnmc serve` (one of each a session) --
@pytest.fixture(scope="module", params=["mlflow_server", "cnmc_server"])
def server(request: pytest.FixtureRequest) -> Server:
    """Each HTTP contract test runs against both servers of the champion."""
    return request.getfixturevalue(request.param)


def send(url: str, body: bytes, content_type: str) -> tuple[int, str, bytes]:
    """POST ``body`` to ``url``'s ``/invocations``: status, Content-Type and the answer's bytes."""
    request = urllib.request.Request(f"{url}/invocations", data=body, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers["Content-Type"], error.read()


def post(server: Server, body: Any, content_type: str = "application/json") -> tuple[int, Any]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    status, _, answer = send(server.url, data, content_type)
    try:
        return status, json.loads(answer)
    except json.JSONDecodeError:
        return status, answer.decode()


def assert_predictions(server: Server, status: int, body: Any, n: int) -> list[dict[str, Any]]:
    assert status == 200, body
    rows = body["predictions"]
    assert len(rows) == n
    for row in rows:
        assert set(row) == set(CELL_COLUMNS)
        assert row["label"] == ("all" if row["prob_all"] >= row["threshold"] else "hem")
        assert 0.0 <= row["prob_all"] <= 1.0 and row["threshold"] == pytest.approx(server.threshold)
    return rows


def assert_refused(status: int, body: Any, message: str) -> None:
    assert 400 <= status < 500, (status, body)
    assert isinstance(body, dict), body  # JSON, not a plain-text error page
    assert message in body["message"], body["message"][-500:]
    assert "stack_trace" not in body and "Traceback" not in body["message"]


@pytest.mark.slow
def test_served_model_answers_split_records_and_inputs(server: Server, good_bmp: bytes) -> None:
    value = b64(good_bmp)
    split = assert_predictions(server, *post(server, {"dataframe_split": {"columns": ["image"], "data": [[value]]}}), 1)
    records = assert_predictions(server, *post(server, {"dataframe_records": [{"image": value}]}), 1)
    image = cell_image()
    formats = [b64(encoded(image, fmt)) for fmt in ("BMP", "PNG", "JPEG", "TIFF")]
    inputs = assert_predictions(server, *post(server, {"inputs": formats}), 4)
    # The same pixels get the same answer in any request format and batch; the probability to
    # float32 rounding (a conv's sums differ in the last bits with the batch's size and position).
    for same in (records[0], inputs[0], inputs[1], inputs[3]):  # BMP, then the lossless formats
        assert same["label"] == split[0]["label"] and same["threshold"] == split[0]["threshold"]
        assert same["prob_all"] == pytest.approx(split[0]["prob_all"], abs=1e-6)
    assert abs(inputs[2]["prob_all"] - inputs[0]["prob_all"]) < 0.1  # JPEG


@pytest.mark.slow
def test_served_model_refuses_bad_values_with_400_and_goes_on(
    server: Server, good_bmp: bytes, bomb_png: bytes, tmp_path: Path
) -> None:
    marker = tmp_path / "unpickled"
    good = {"dataframe_split": {"columns": ["image"], "data": [[b64(good_bmp)]]}}
    for name, (value, message) in bad_values(good_bmp, bomb_png, marker).items():
        status, body = post(server, {"dataframe_split": {"columns": ["image"], "data": [[b64(good_bmp)], [value]]}})
        assert status == 400, (name, body)
        assert_refused(status, body, message)
        assert "row 1: " in body["message"], name
        assert_predictions(server, *post(server, good), 1)  # still serving
    assert not marker.exists()


@pytest.mark.slow
def test_served_model_refuses_bad_requests_with_json_4xx(
    server: Server, good_bmp: bytes, bomb_png: bytes, tmp_path: Path
) -> None:
    value = b64(good_bmp)
    real_file = tmp_path / "cell.bmp"
    real_file.write_bytes(good_bmp)
    cases = [
        # MLflow's schema check says "missing inputs ['image']"; cnmc serve's own model "missing column 'image'"
        ({"dataframe_split": {"columns": ["picture"], "data": [[value]]}}, "'image'"),
        ({"dataframe_records": [{"img": value}]}, "'image'"),
        ({"inputs": [value, "%%%"]}, "row 1: 'image' is not valid base64"),
        ({"inputs": [b64(bomb_png)]}, "row 0: too large"),
        ({"inputs": [str(real_file)]}, "row 0: 'image' is not valid base64"),  # a path is not read
        ({"inputs": []}, "no images in the request"),
        ({"dataframe_records": [{"image": 3.5}]}, "must be a base64 string, got float"),
        ({"dataframe_split": {"columns": ["image"], "data": [[["nested"]]]}}, "must be a base64 string, got list"),
        ({"image": value}, "exactly one of the input fields"),
        (b"{not json", "valid JSON"),
    ]
    for body, message in cases:
        status, answer = post(server, body)
        assert_refused(status, answer, message)
    assert_predictions(server, *post(server, {"inputs": [value]}), 1)


@pytest.mark.slow
def test_served_model_logs_no_traceback_for_bad_input(server: Server) -> None:
    """The server's own log: refusals are warnings at most, never an unhandled exception."""
    log = server.log.read_text()
    assert "Exception in ASGI application" not in log
    assert "Internal Server Error" not in log


def good_requests(good_bmp: bytes) -> dict[str, tuple[bytes, str]]:
    """name -> (body, Content-Type): every request format MLflow's server takes, one real-size cell."""
    image = cell_image()
    values = [
        b64(good_bmp),
        b64(encoded(image, "PNG")),
        b64(encoded(image, "JPEG")),
        b64(encoded(cell_image(seed=1, size=450), "BMP")),
    ]
    split = {"dataframe_split": {"columns": ["image"], "data": [[v] for v in values]}}
    frame = pd.DataFrame({"image": values})
    as_json = {
        "dataframe_split": split,
        "dataframe_records": {"dataframe_records": [{"image": v} for v in values]},
        "inputs": {"inputs": values},
        "instances": {"instances": values[:2]},
        "tta": {**split, "params": {"tta": True}},
    }
    requests = {name: (json.dumps(body).encode(), "application/json") for name, body in as_json.items()}
    requests["charset"] = (requests["inputs"][0], "application/json; charset=UTF-8")
    requests["csv"] = (frame.to_csv(index=False).encode(), "text/csv")
    requests["parquet"] = (frame.to_parquet(), "application/vnd.apache.parquet")
    return requests


@pytest.mark.slow
def test_cnmc_serve_answers_good_requests_byte_for_byte_like_mlflow_models_serve(
    mlflow_server: Server, cnmc_server: Server, good_bmp: bytes
) -> None:
    for name, (body, content_type) in good_requests(good_bmp).items():
        theirs = send(mlflow_server.url, body, content_type)
        ours = send(cnmc_server.url, body, content_type)
        assert theirs[0] == 200, (name, theirs[2][:300])
        assert ours == theirs, (name, ours[2][:300], theirs[2][:300])
