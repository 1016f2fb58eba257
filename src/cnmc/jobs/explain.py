"""``cnmc explain --model URI IMAGE...``: one Grad-CAM overlay PNG per image file, for a logged or
registered pyfunc model (the maths and the figures: :mod:`cnmc.plots.gradcam`)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cnmc.core.atomic import atomic_write_text, output_folder
from cnmc.core.errors import CnmcError
from cnmc.core.names import shown
from cnmc.inference.probability import predict_proba
from cnmc.inference.spec import ModelSpec
from cnmc.plots.gradcam import gradcam_heatmaps, single_png
from cnmc.serving.pyfunc import Member, decode_image
from cnmc.serving.scoring import find_images, load_image_model, read_image

log = logging.getLogger(__name__)


def explain_images(model_uri: str, image_paths: list[str], out_dir: Path | str, trust: bool = False) -> list[Path]:
    """``cnmc explain --model URI IMAGE...``: one Grad-CAM overlay PNG per image.

    ``image_paths``: files, folders or glob patterns, as ``cnmc predict`` takes them. Each image
    is preprocessed exactly as the served model does it; its overlay ``<out_dir>/<stem>.gradcam.png``
    shows the cell, the overlay, ``prob_all`` and the label at the model's threshold. A file that
    can't be read as an image is skipped with a warning; ``<out_dir>/explanations.csv`` lists every
    file with its result or error. Returns the PNGs written (CnmcError if none could be).
    """
    files = find_images(image_paths)
    members, spec = _members(load_image_model(model_uri, trust), model_uri)
    model = members[0].model  # Grad-CAM of the first model (a cross-fit's fold 0); p(ALL) is the served mean
    out_dir = Path(out_dir)
    output_folder(out_dir)
    written: list[Path] = []
    rows: list[dict[str, Any]] = []
    names: set[str] = set()
    for path in files:
        row: dict[str, Any] = {
            "path": shown(path),
            "label": None,
            "prob_all": None,
            "threshold": spec.threshold,
            "overlay": None,
            "error": None,
        }
        rows.append(row)
        try:
            image = decode_image(read_image(path), spec.framing)[None]
        except CnmcError as exc:
            row["error"] = str(exc)
            log.warning("%s: skipped (%s)", path, exc)
            continue
        prob = float(np.mean([predict_proba(m.model, image, m.spec)[0] for m in members]))
        predicted = int(prob >= spec.threshold)
        heatmap = gradcam_heatmaps(model, spec, image, targets=[predicted])[0]
        out = out_dir / _unique_name(path, names)
        single_png(image[0], heatmap, out, path.name, prob, spec)
        row.update(label="all" if predicted else "hem", prob_all=prob, overlay=str(out))
        written.append(out)
    atomic_write_text(out_dir / "explanations.csv", pd.DataFrame(rows).to_csv(index=False))
    if not written:
        raise CnmcError(f"no image could be explained: see {out_dir / 'explanations.csv'}")
    return written


def _members(pyfunc: Any, model_uri: str) -> tuple[list[Member], ModelSpec]:
    """The served model's members (one model, or an ensemble's) and the spec it answers with, or CnmcError."""
    try:
        python_model = pyfunc.unwrap_python_model()
    except Exception as exc:
        raise CnmcError(f"model {model_uri!r} is not a cnmc python model ({exc.__class__.__name__})") from None
    members = getattr(python_model, "members", None) or [getattr(python_model, "member", None)]
    if not all(isinstance(m, Member) for m in members) or not isinstance(
        getattr(python_model, "spec", None), ModelSpec
    ):
        raise CnmcError(f"model {model_uri!r} has no torch model and ModelSpec: not a cnmc image model")
    return members, python_model.spec


def _unique_name(path: Path, taken: set[str]) -> str:
    stem, k = path.stem, 1
    name = f"{stem}.gradcam.png"
    while name in taken:
        k += 1
        name = f"{stem}-{k}.gradcam.png"
    taken.add(name)
    return name
