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

import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from cnmc.core.atomic import atomic_write_bytes, atomic_write_text
from cnmc.core.errors import CnmcError
from cnmc.core.names import shown
from cnmc.data.layout import LABELS_CSV, NAME_PATTERN, labels_csv_for, parse_cell_name
from cnmc.data.manifest import read_prelim_labels
from cnmc.inference.schema import BATCH_COLUMNS, CELL_FILE, no_answer, threshold_of
from cnmc.metrics.patients import call_people
from cnmc.serving.scoring import find_images, load_image_model, read_file_bytes, score_images


@dataclass(frozen=True)
class People:
    """How ``cnmc predict`` groups cells into people: every input one person's (``subject``), or by
    the subject of each file (``csv``'s ``path,subject`` rows first, then the C-NMC file name)."""

    subject: str | None = None
    csv: Path | None = None

    def subjects(self, files: list[Path]) -> list[str]:
        """Each file's person, or a one-line error naming the first file whose person is unknown
        (before any model is loaded). A renamed preliminary-phase cell (``12.bmp``) is found in the
        C-NMC labels CSV inside or beside its folder, whose ``Patient_ID`` is its original name."""
        if self.subject is not None:
            return [self.subject] * len(files)
        known = _subjects_csv(self.csv) if self.csv else {}
        beside: dict[Path, dict[str, str]] = {}
        out = []
        for path in files:
            found = known.get(str(path)) or known.get(path.name) or known.get(path.name.lower())
            if found is None and (cell := parse_cell_name(path.name)) is not None:
                found = cell.subject
            if found is None and not self.csv:
                if path.parent not in beside:
                    labels = labels_csv_for(path.parent)
                    beside[path.parent] = _labels_subjects(labels) if labels else {}
                found = beside[path.parent].get(path.name.lower())
            if found is None:
                where = f"not in {self.csv} and " if self.csv else ""
                raise CnmcError(
                    f"{path}: {where}not a C-NMC name ({NAME_PATTERN}) and not in a C-NMC labels CSV "
                    f"({LABELS_CSV}) inside or beside its folder, so its person is unknown; give "
                    "--subjects-csv FILE (columns path, subject; or the labels CSV) or --subject NAME"
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
    spark_master: str | None = None,
    trust: bool = False,
) -> PredictSummary:
    """Predict every image that ``inputs`` name with the pyfunc at ``model_uri``; write ``out_csv``
    (CSV, or Parquet where it ends in ``.parquet``; with ``people``: one row per person, and the
    cells beside it). ``inputs``: files, folders, glob patterns, or Parquet files with a ``path``
    column. ``spark_master``: score on Spark at that master (:mod:`cnmc.serving.spark`) instead of
    in this process; the rows, and so the files written, are the same. ``trust``: load the model
    with its own code (:mod:`cnmc.serving.trusted`).

    Raises :class:`CnmcError` (one line) when an input matches nothing, a person can't be told or
    the model can't be loaded.
    """
    if batch_size < 1:
        raise CnmcError(f"batch size must be at least 1, got {batch_size}")
    start = time.perf_counter()
    files = find_images(expand_path_tables(inputs))
    subjects = people.subjects(files) if people else None
    if spark_master is not None:
        from cnmc.serving.spark import score_on_spark

        rows = score_on_spark(model_uri, files, spark_master, batch_size, trust)
    else:
        rows = _score_here(model_uri, files, batch_size, progress, trust)

    table = pd.DataFrame(rows, columns=BATCH_COLUMNS)
    out_csv = Path(out_csv)
    ok = table["error"].isna()
    cells_csv, calls = None, {}
    if subjects is None:
        _write_csv(table, out_csv)
    else:
        table.insert(1, "subject", subjects)
        threshold = threshold_of(rows)
        by_person = call_people(
            subjects,
            pd.to_numeric(table["prob_all"]).to_numpy(dtype=float),
            threshold,
            ood=table["ood"].fillna(False).astype(bool).to_numpy(),
            pixel_hashes=list(table["pixel_hash"].fillna("")),
        )
        cells_csv = out_csv.with_name(f"{out_csv.stem}.cells{out_csv.suffix or '.csv'}")
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
    return summary


def _score_here(
    model_uri: str, files: list[Path], batch_size: int, progress: bool, trust: bool
) -> list[dict[str, Any]]:
    """One row per file, in order, scored in this process in batches of ``batch_size``."""
    from tqdm.auto import tqdm

    model = load_image_model(model_uri, trust)
    rows: list[dict[str, Any]] = []
    with tqdm(total=len(files), unit="img", desc="predict", disable=not progress) as bar:
        for chunk_start in range(0, len(files), batch_size):
            chunk = files[chunk_start : chunk_start + batch_size]
            rows.extend(_predict_chunk(model, chunk))
            bar.update(len(chunk))
    return rows


def expand_path_tables(inputs: list[str]) -> list[str]:
    """``inputs`` with each Parquet file replaced by the paths in its ``path`` column (an archive's
    index of image files); a one-line error naming a table that cannot be read or has no such column."""
    out: list[str] = []
    for text in inputs:
        if not str(text).lower().endswith(".parquet"):
            out.append(text)
            continue
        try:
            table = pd.read_parquet(text, columns=[CELL_FILE.name])
        except (OSError, ValueError, KeyError) as exc:
            raise CnmcError(f"{text}: not a Parquet table with a '{CELL_FILE.name}' column ({exc})"[:300]) from None
        if table.empty:
            raise CnmcError(f"{text}: the Parquet table lists no image paths")
        out += [str(p) for p in table[CELL_FILE.name]]
    return out


def _write_csv(table: pd.DataFrame, path: Path) -> None:
    """Write ``table`` atomically: Parquet where ``path`` ends in ``.parquet``, else CSV."""
    if path.suffix.lower() == ".parquet":
        import io

        buffer = io.BytesIO()
        table.to_parquet(buffer, index=False)
        atomic_write_bytes(path, buffer.getvalue())
    else:
        atomic_write_text(path, spreadsheet_safe(table).to_csv(index=False))


FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")  # what a spreadsheet may run as a formula (OWASP)


def spreadsheet_safe(table: pd.DataFrame) -> pd.DataFrame:
    """``table`` with every text cell that a spreadsheet would take for a formula (``=HYPERLINK(...)``,
    ``@cmd``, ``+1``) prefixed with a single quote, as OWASP's CSV-injection advice says; numbers
    are left as they are."""
    out = table.copy()
    for column in out.columns:
        if out[column].dtype == object or pd.api.types.is_string_dtype(out[column]):
            out[column] = out[column].map(
                lambda v: f"'{v}" if isinstance(v, str) and v.startswith(FORMULA_STARTS) else v
            )
    return out


def _subjects_csv(path: Path) -> dict[str, str]:
    """``path -> subject`` from a CSV with those columns, or ``file name -> subject`` from the C-NMC
    labels CSV (``Patient_ID,new_names,labels``); a one-line error naming the file otherwise."""
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise CnmcError(f"{path}: cannot read the subjects CSV ({exc.__class__.__name__})") from None
    if {"Patient_ID", "new_names"} <= {str(c).strip() for c in table.columns}:
        return _labels_subjects(path)
    missing = {"path", "subject"} - set(table.columns)
    if missing:
        raise CnmcError(f"{path}: the subjects CSV needs columns path and subject (no {', '.join(sorted(missing))})")
    twice = table[table["path"].duplicated(keep=False)].groupby("path")["subject"].nunique()
    if (twice > 1).any():  # last row wins would call one patient's cells another's
        file = twice[twice > 1].index[0]
        rows = ", ".join(str(i + 2) for i in table.index[table["path"] == file])
        raise CnmcError(f"{path}: {file!r} is given to more than one person (rows {rows}); give each file one subject")
    return dict(zip(table["path"], table["subject"], strict=True))


def _labels_subjects(path: Path) -> dict[str, str]:
    """Lower-case new name -> subject, from a C-NMC labels CSV: each ``Patient_ID`` is the cell's
    original C-NMC name, which names its person."""
    subjects = {}
    for new_name, label in read_prelim_labels(path).items():
        cell = parse_cell_name(label.original_name)
        if cell is None:
            raise CnmcError(f"{path}: Patient_ID {label.original_name!r} is not a C-NMC name ({NAME_PATTERN})")
        subjects[new_name] = cell.subject
    return subjects


def _predict_chunk(model: Any, files: list[Path]) -> list[dict[str, Any]]:
    """Rows for ``files``: read each (errors become rows), then score the readable ones together."""
    rows: list[dict[str, Any]] = []
    good: list[tuple[int, bytes]] = []
    for path in files:
        rows.append({CELL_FILE.name: shown(path)} | no_answer())  # a CSV cell, whatever the name
        try:
            data = read_file_bytes(path)
        except CnmcError as exc:
            rows[-1]["error"] = str(exc)
            continue
        good.append((len(rows) - 1, data))
    for (index, _), result in zip(good, score_images(model, [data for _, data in good]), strict=True):
        rows[index].update(result)
    return rows
