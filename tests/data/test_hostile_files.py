"""Odd files meet the same rules everywhere (manifest, `cnmc predict`, the served model): file names
that are not UTF-8 or hold a newline, formats outside BMP/PNG/JPEG/TIFF, several frames in one file,
images too small to hold a cell. One line each, never a traceback, never a CSV row split in two.
Real files in ``tmp_path``; the model is the small one logged before the layout move."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnmc.cli import main
from cnmc.data.images import ImageProblem, open_rgb
from cnmc.inference.schema import CELL_COLUMNS
from cnmc.serving.scoring import load_image_model, score_images

MODEL = Path(__file__).parents[1] / "fixtures" / "pyfunc_before_layout_move"
ODD_NAMES = (b"bad\xffname.png", b"line\nbreak.png", b"tab\tand\x1bescape.png")


def pixels(side: int = 40, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)


def encoded(fmt: str, side: int = 40, **save: object) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels(side)).save(buffer, format=fmt, **save)
    return buffer.getvalue()


def two_frame_gif_and_tiff() -> dict[str, bytes]:
    frames = [Image.fromarray(pixels(seed=k)) for k in range(2)]
    out = {}
    for fmt in ("GIF", "TIFF"):
        buffer = io.BytesIO()
        frames[0].save(buffer, format=fmt, save_all=True, append_images=frames[1:])
        out[fmt] = buffer.getvalue()
    return out


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (encoded("GIF"), "not an image of a format cnmc reads (BMP, PNG, JPEG, TIFF)"),
        (encoded("WEBP"), "not an image of a format cnmc reads"),
        (two_frame_gif_and_tiff()["TIFF"], "2 frames in one file; send one image a file"),
        (encoded("PNG", side=1), "too small (1x1 pixels; at least 8 a side)"),
        (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", "not an image of a format cnmc reads"),
    ],
)
def test_the_decoder_takes_only_the_documented_formats(data: bytes, reason: str) -> None:
    with pytest.raises(ImageProblem, match=reason.replace("(", r"\(").replace(")", r"\)")):
        open_rgb(data)


def test_the_served_model_refuses_them_by_row_and_answers_the_rest() -> None:
    model = load_image_model(str(MODEL))
    answers = score_images(model, [encoded("PNG"), encoded("GIF"), encoded("PNG", side=4), encoded("JPEG")])
    assert [sorted(a) for a in answers] == [
        sorted(CELL_COLUMNS),
        ["error"],
        ["error"],
        sorted(answers[0]),
    ]
    assert "format cnmc reads" in answers[1]["error"] and "too small" in answers[2]["error"]


def write_bytes_at(folder: Path, name: bytes, data: bytes) -> None:
    """A file whose name is raw bytes (pathlib takes only text)."""
    with open(os.path.join(os.fsencode(folder), name), "wb") as file:
        file.write(data)


def write_odd_folder(folder: Path) -> None:
    folder.mkdir(parents=True)
    for name in ODD_NAMES:
        write_bytes_at(folder, name, encoded("PNG"))
    (folder / "good.png").write_bytes(encoded("PNG"))
    (folder / "animated.gif").write_bytes(two_frame_gif_and_tiff()["GIF"])
    (folder / "notes.txt").write_text("not named like an image: not a row")


def test_predict_writes_one_csv_row_a_file_whatever_its_name(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    write_odd_folder(tmp_path / "cells")
    out = tmp_path / "predictions.csv"
    assert main(["predict", "--model", str(MODEL), str(tmp_path / "cells"), "-o", str(out), "-q"]) == 0
    rows = list(csv.DictReader(io.StringIO(out.read_text(encoding="utf-8"))))
    assert len(out.read_text(encoding="utf-8").splitlines()) == 1 + len(rows) == 1 + 5  # no row split in two
    by_name = {Path(row["path"]).name: row for row in rows}
    for shown in ("bad\\xffname.png", "line\\nbreak.png", "tab\\tand\\x1bescape.png", "good.png"):
        assert by_name[shown]["label"] in ("all", "hem") and not by_name[shown]["error"], shown
    assert "format cnmc reads" in by_name["animated.gif"]["error"]  # listed with its reason, not skipped
    assert "5 files: 4 predicted" in capsys.readouterr().out


def test_manifest_excludes_names_it_could_not_read_back_and_says_why(tmp_path: Path) -> None:
    for label in ("all", "hem"):
        (tmp_path / "data" / label).mkdir(parents=True)
        for k in range(2):
            Image.fromarray(pixels(seed=k + (label == "hem") * 10)).save(tmp_path / "data" / label / f"c{k}.png")
    for name in ODD_NAMES:
        write_bytes_at(tmp_path / "data" / "all", name, encoded("PNG"))
    report = tmp_path / "report.json"
    code = main(["manifest", str(tmp_path / "data"), "-o", str(tmp_path / "m.csv"), "--report", str(report)])
    assert code == 0
    assert len((tmp_path / "m.csv").read_text(encoding="utf-8").splitlines()) == 1 + 4
    excluded = {e["path"].rsplit("/", 1)[-1]: e["reason"] for e in json.loads(report.read_text())["excluded"]}
    assert excluded["bad\\xffname.png"] == "the file name is not UTF-8 text: rename it"
    assert excluded["line\\nbreak.png"].startswith("the file name holds a control character")
