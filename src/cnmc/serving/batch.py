"""Batch prediction: ``cnmc predict --model URI PATH... -o predictions.csv``.

Inputs are image files, folders (searched recursively for image extensions) and glob patterns.
Every file gets one output row, in input order: a predicted ``label``, ``prob_all`` and
``threshold``, or an ``error`` naming why it couldn't be used (unreadable, not an image,
truncated, too large, a broken link, not a regular file). By person (``--by subject``: the
subject of each C-NMC file name, or of a ``--subjects-csv`` column; ``--subject NAME``: every
input is one person's), the output is one row per person (:mod:`cnmc.metrics.patients`) and the cell
rows, with their subject, go beside it (``<output>.cells.csv``). A bad file never stops the batch: each
file is read and decoded first with the serving code's own checks, then the good ones go through
the loaded pyfunc in batches. Links to folders inside a folder or below a ``**`` are not
followed (:func:`cnmc.data.layout.walk_files`), so a link loop can neither repeat nor hang.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from cnmc.core.atomic import atomic_write_text
from cnmc.core.errors import CnmcError
from cnmc.data.images import ImageProblem, open_rgb, read_image_file
from cnmc.data.layout import NAME_PATTERN, parse_cell_name, walk_files
from cnmc.metrics.patients import call_people
from cnmc.serving.pyfunc import IMAGE_COLUMN, MAX_IMAGE_BYTES

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".bmp", ".png", ".jpg", ".jpeg", ".tif", ".tiff")
COLUMNS = ["path", "label", "prob_all", "threshold", "error"]
_GLOB_CHARS = frozenset("*?[")


@dataclass(frozen=True)
class People:
    """How ``cnmc predict`` groups cells into people: every input one person's (``subject``), or by
    the subject of each file (``csv``'s ``path,subject`` rows first, then the C-NMC file name)."""

    subject: str | None = None
    csv: Path | None = None

    def subjects(self, files: list[Path]) -> list[str]:
        if self.subject is not None:
            return [self.subject] * len(files)
        known = _subjects_csv(self.csv) if self.csv else {}
        out = []
        for path in files:
            found = known.get(str(path)) or known.get(path.name)
            if found is None and (cell := parse_cell_name(path.name)) is not None:
                found = cell.subject
            if found is None:
                where = f"not in {self.csv} and " if self.csv else ""
                raise CnmcError(
                    f"{path}: {where}not a C-NMC name ({NAME_PATTERN}), so its person is unknown; "
                    "give --subjects-csv FILE (columns path, subject) or --subject NAME"
                )
            out.append(found)
        return out


@dataclass(frozen=True)
class PredictSummary:
    """What :func:`predict_paths` did; ``counts`` maps each predicted label to its number of files,
    ``calls`` each person's call to its number of people (by person only)."""

    out_csv: Path
    total: int
    predicted: int
    failed: int
    counts: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    cells_csv: Path | None = None
    calls: dict[str, int] = field(default_factory=dict)

    def line(self) -> str:
        labels = ", ".join(f"{k}: {v}" for k, v in sorted(self.counts.items())) or "none"
        cells = f"{self.total} files: {self.predicted} predicted ({labels}), {self.failed} failed"
        if self.cells_csv is None:
            return f"{cells} -> {self.out_csv} ({self.seconds:.1f} s)"
        people = ", ".join(f"{k or 'no call'}: {v}" for k, v in sorted(self.calls.items()))
        return (
            f"{sum(self.calls.values())} people ({people}) -> {self.out_csv}; {cells} -> {self.cells_csv} "
            f"({self.seconds:.1f} s)"
        )


def predict_paths(
    model_uri: str,
    inputs: list[str],
    out_csv: Path,
    batch_size: int = 32,
    progress: bool = True,
    people: People | None = None,
) -> PredictSummary:
    """Predict every image that ``inputs`` name with the pyfunc at ``model_uri``; write ``out_csv``
    (with ``people``: one row per person, and the cells beside it).

    Raises :class:`CnmcError` (one line) when an input matches nothing, a person can't be told or
    the model can't be loaded.
    """
    if batch_size < 1:
        raise CnmcError(f"batch size must be at least 1, got {batch_size}")
    start = time.perf_counter()
    files = find_images(inputs)
    subjects = people.subjects(files) if people else None
    model = load_image_model(model_uri)
    rows: list[dict[str, Any]] = []
    from tqdm.auto import tqdm

    with tqdm(total=len(files), unit="img", desc="predict", disable=not progress) as bar:
        for chunk_start in range(0, len(files), batch_size):
            chunk = files[chunk_start : chunk_start + batch_size]
            rows.extend(_predict_chunk(model, chunk))
            bar.update(len(chunk))

    table = pd.DataFrame(rows, columns=COLUMNS)
    out_csv = Path(out_csv)
    ok = table["error"].isna()
    cells_csv, calls = None, {}
    if subjects is None:
        _write_csv(table, out_csv)
    else:
        table.insert(1, "subject", subjects)
        threshold = float(table.loc[ok, "threshold"].iloc[0]) if ok.any() else 0.5
        by_person = call_people(subjects, pd.to_numeric(table["prob_all"]).to_numpy(dtype=float), threshold)
        cells_csv = out_csv.with_name(f"{out_csv.stem}.cells.csv")
        _write_csv(table, cells_csv)
        _write_csv(by_person, out_csv)
        calls = dict(Counter(by_person["call"]))
    summary = PredictSummary(
        out_csv=out_csv,
        total=len(table),
        predicted=int(ok.sum()),
        failed=int((~ok).sum()),
        counts=dict(Counter(table.loc[ok, "label"])),
        seconds=time.perf_counter() - start,
        cells_csv=cells_csv,
        calls=calls,
    )
    log.info("%s", summary.line())
    return summary


def _write_csv(table: pd.DataFrame, path: Path) -> None:
    atomic_write_text(path, table.to_csv(index=False))


def _subjects_csv(path: Path) -> dict[str, str]:
    """``path -> subject`` from a CSV with those columns; a one-line error naming the file otherwise."""
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise CnmcError(f"{path}: cannot read the subjects CSV ({exc.__class__.__name__})") from None
    missing = {"path", "subject"} - set(table.columns)
    if missing:
        raise CnmcError(f"{path}: the subjects CSV needs columns path and subject (no {', '.join(sorted(missing))})")
    return dict(zip(table["path"], table["subject"], strict=True))


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


def load_image_model(model_uri: str) -> Any:
    """``mlflow.pyfunc.load_model`` of a cnmc image model, or a one-line :class:`CnmcError`."""
    import mlflow

    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*type hints.*")
            model = mlflow.pyfunc.load_model(model_uri)
    except Exception as exc:  # MLflow raises many types for bad URIs, missing runs, bad stores
        first = (str(exc).strip().splitlines() or [exc.__class__.__name__])[0][:300]
        raise CnmcError(f"cannot load model {model_uri!r}: {first}") from None
    schema = model.metadata.get_input_schema()
    if schema is None or IMAGE_COLUMN not in (schema.input_names() if schema.has_input_names() else []):
        raise CnmcError(f"model {model_uri!r} does not take an '{IMAGE_COLUMN}' column: not a cnmc image model")
    return model


def _images_under(folder: Path) -> list[Path]:
    """Every entry below ``folder`` named like an image, whatever it is (a broken link or a FIFO
    gets its error row); links to folders are logged and not followed."""
    files, unsearched = walk_files(folder, skip_hidden=False)
    for path, reason in unsearched:
        log.warning("%s: %s", path, reason)
    return [path for path in files if path.suffix.lower() in IMAGE_EXTENSIONS]


def _predict_chunk(model: Any, files: list[Path]) -> list[dict[str, Any]]:
    """Rows for ``files``: read each (errors become rows), then score the readable ones together."""
    rows: list[dict[str, Any]] = []
    good: list[tuple[int, bytes]] = []
    for path in files:
        rows.append({"path": str(path), "label": None, "prob_all": None, "threshold": None, "error": None})
        try:
            data = _read_bytes(path)
        except CnmcError as exc:
            rows[-1]["error"] = str(exc)
            continue
        good.append((len(rows) - 1, data))
    for (index, _), result in zip(good, score_images(model, [data for _, data in good]), strict=True):
        rows[index].update(result)
    return rows


def score_images(model: Any, images: list[bytes]) -> list[dict[str, Any]]:
    """``label``, ``prob_all`` and ``threshold`` for each encoded image, or its ``error``: each is
    decoded first with the serving code's checks, then the good ones go through the model together
    (one by one where the model refuses the batch, so one bad image never costs the others)."""
    results: list[dict[str, Any]] = [{} for _ in images]
    good: list[tuple[int, bytes]] = []
    for index, data in enumerate(images):
        try:
            _check_image(data)
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
            results[index] = _result(record)
    except MlflowException:  # a file the model refuses (its serving code may be older): keep the rest
        for index, data in good:
            try:
                results[index] = _result(_predict_bytes(model, [data]).to_dict("records")[0])
            except MlflowException as exc:
                results[index] = {"error": _reason(exc)}
    return results


def read_image(path: Path) -> bytes:
    """The file's bytes if it decodes as an image (the checks the served model makes), else CnmcError."""
    data = _read_bytes(path)
    _check_image(data)
    return data


def _read_bytes(path: Path) -> bytes:
    try:
        return read_image_file(path, MAX_IMAGE_BYTES)
    except OSError as exc:
        raise CnmcError(f"cannot read the file ({exc.strerror or exc.__class__.__name__})") from None
    except ImageProblem as exc:
        raise CnmcError(str(exc)) from None


def _check_image(data: bytes) -> None:
    """CnmcError unless ``data`` decodes as an image (the checks the served model makes)."""
    try:
        open_rgb(data)
    except ImageProblem as exc:
        raise CnmcError(str(exc)) from None
    except Exception as exc:  # Pillow plugins raise almost anything on malformed bytes
        raise CnmcError(f"could not decode the image ({exc.__class__.__name__}: {exc})"[:300]) from None


def _predict_bytes(model: Any, images: list[bytes]) -> pd.DataFrame:
    import base64

    request = pd.DataFrame({IMAGE_COLUMN: [base64.b64encode(data).decode("ascii") for data in images]})
    return model.predict(request)


def _result(record: dict[str, Any]) -> dict[str, Any]:
    return {"label": record["label"], "prob_all": float(record["prob_all"]), "threshold": float(record["threshold"])}


def _reason(exc: Exception) -> str:
    message = (getattr(exc, "message", None) or str(exc)).strip() or exc.__class__.__name__
    return message.splitlines()[-1].removeprefix("Error: ").removeprefix("row 0: ")[:300]
