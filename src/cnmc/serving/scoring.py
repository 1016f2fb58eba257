"""Talking to a loaded image model, as the server, batch prediction and Grad-CAM do: find the
image files a user names, read and check them with the served model's own checks, load a cnmc
pyfunc, and score encoded images so that one bad image never costs the others.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from cnmc.core.errors import CnmcError
from cnmc.data.images import IMAGE_EXTENSIONS, ImageProblem, image_like, open_rgb, read_image_file
from cnmc.data.layout import walk_files
from cnmc.inference.schema import REQUEST_COLUMN, cell_record
from cnmc.serving.pyfunc import MAX_IMAGE_BYTES

log = logging.getLogger(__name__)

_GLOB_CHARS = frozenset("*?[")


def find_images(inputs: Iterable[str]) -> list[Path]:
    """Files named by ``inputs`` in order, without duplicates; :class:`CnmcError` if one matches nothing.

    A file is taken as it is (a non-image, a broken link or a FIFO becomes an error row); a
    folder gives its image files (recursively, by extension); a pattern with ``* ? [`` is
    expanded (``**`` recurses), its folders like folders.
    """
    found: list[Path] = []
    seen: set[object] = set()
    inputs = list(inputs)
    if not inputs:
        raise CnmcError("no input: give image files, folders or glob patterns")
    for text in inputs:
        text = str(text)
        path = Path(text)
        if path.is_dir():
            matches = _images_under(path)
            if not matches:
                raise CnmcError(f"{text}: folder has no image files ({', '.join(IMAGE_EXTENSIONS)})")
        elif os.path.lexists(path):  # a file, or something named like one: its row will say
            matches = [path]
        elif _GLOB_CHARS & set(text):
            matches = [m for hit in _glob(text) for m in (_images_under(hit) if hit.is_dir() else [hit])]
            if not matches:
                raise CnmcError(f"{text}: no file matches this pattern")
        else:
            raise CnmcError(f"{text}: no such file or folder")
        for match in matches:
            key = _identity(match)
            if key not in seen:
                seen.add(key)
                found.append(match)
    return found


def _glob(pattern: str) -> list[Path]:
    """The paths ``pattern`` matches, sorted; hidden names only where the pattern has one, as
    with :func:`glob.glob`, whose ``**`` however follows links to folders (two links to ``.``
    make that endless), where pathlib's, used here, does not."""
    parts = Path(pattern).parts
    first = next(i for i, part in enumerate(parts) if _GLOB_CHARS & set(part))
    base, rest = Path(*parts[:first]), Path(*parts[first:])
    try:
        hits = list(base.glob(rest.as_posix()))
    except ValueError as exc:  # e.g. "a**": pathlib takes ** only as a whole path component
        raise CnmcError(f"{pattern}: {exc}") from None
    if not any(part.startswith(".") for part in rest.parts):
        hits = [hit for hit in hits if not any(p.startswith(".") for p in hit.relative_to(base).parts)]
    return sorted(hits)


def _identity(path: Path) -> object:
    """The same file gives the same key, however it is named or linked to; a path that can't be
    followed (a broken link) is its own."""
    try:
        status = os.stat(path)
    except OSError:
        return os.path.abspath(path)
    return (status.st_dev, status.st_ino)


def load_image_model(model_uri: str, trust: bool = False) -> Any:
    """A cnmc image model, loaded without running its code unless ``trust`` (:mod:`cnmc.serving.trusted`),
    or a one-line :class:`CnmcError`."""
    from cnmc.serving.trusted import load_served_model

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*type hints.*")
        model = load_served_model(model_uri, trust)
    schema = model.metadata.get_input_schema()
    if schema is None or REQUEST_COLUMN not in (schema.input_names() if schema.has_input_names() else []):
        raise CnmcError(f"model {model_uri!r} does not take an '{REQUEST_COLUMN}' column: not a cnmc image model")
    return model


def _images_under(folder: Path) -> list[Path]:
    """Every entry below ``folder`` named like an image, whatever it is (a broken link or a FIFO
    gets its error row); links to folders are logged and not followed."""
    files, unsearched = walk_files(folder, skip_hidden=False)
    for path, reason in unsearched:
        log.warning("%s: %s", path, reason)
    return [path for path in files if image_like(path)]


def score_images(model: Any, images: list[bytes]) -> list[dict[str, Any]]:
    """``label``, ``prob_all`` and ``threshold`` for each encoded image, or its ``error``: each is
    decoded first with the serving code's checks, then the good ones go through the model together
    (one by one where the model refuses the batch, so one bad image never costs the others)."""
    results: list[dict[str, Any]] = [{} for _ in images]
    good: list[tuple[int, bytes]] = []
    for index, data in enumerate(images):
        try:
            check_image(data)
        except CnmcError as exc:
            results[index] = {"error": str(exc)}
            continue
        good.append((index, data))
    if not good:
        return results
    from mlflow.exceptions import MlflowException

    try:
        out = _predict_bytes(model, [data for _, data in good])
        for (index, _), record in zip(good, out.to_dict("records"), strict=True):
            results[index] = cell_record(record)
    except MlflowException:  # a file the model refuses (its serving code may be older): keep the rest
        for index, data in good:
            try:
                results[index] = cell_record(_predict_bytes(model, [data]).to_dict("records")[0])
            except MlflowException as exc:
                results[index] = {"error": _reason(exc)}
    return results


def read_image(path: Path) -> bytes:
    """The file's bytes if it decodes as an image (the checks the served model makes), else CnmcError."""
    data = read_file_bytes(path)
    check_image(data)
    return data


def read_file_bytes(path: Path) -> bytes:
    """The file's bytes, or a one-line CnmcError (unreadable, too large, not a regular file)."""
    try:
        return read_image_file(path, MAX_IMAGE_BYTES)
    except OSError as exc:
        raise CnmcError(f"cannot read the file ({exc.strerror or exc.__class__.__name__})") from None
    except ImageProblem as exc:
        raise CnmcError(str(exc)) from None


def check_image(data: bytes) -> None:
    """CnmcError unless ``data`` decodes as an image (the checks the served model makes)."""
    try:
        open_rgb(data)
    except ImageProblem as exc:
        raise CnmcError(str(exc)) from None
    except Exception as exc:  # Pillow plugins raise almost anything on malformed bytes
        raise CnmcError(f"could not decode the image ({exc.__class__.__name__}: {exc})"[:300]) from None


def _predict_bytes(model: Any, images: list[bytes]) -> pd.DataFrame:
    import base64

    request = pd.DataFrame({REQUEST_COLUMN: [base64.b64encode(data).decode("ascii") for data in images]})
    return model.predict(request)


def _reason(exc: Exception) -> str:
    message = (getattr(exc, "message", None) or str(exc)).strip() or exc.__class__.__name__
    return message.splitlines()[-1].removeprefix("Error: ").removeprefix("row 0: ")[:300]
