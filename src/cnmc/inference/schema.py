"""The answer a model gives, defined once: for a cell (the served pyfunc, ``cnmc predict``, the
patient route) and for a person (:mod:`cnmc.metrics.patients`).

Each column has a name, a type and a meaning; the pyfunc's logged signature, the batch CSV, the
patient JSON, the model card and ``docs/serving.md`` are built from or checked against these.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

ALL, HEM = "all", "hem"
DEFAULT_THRESHOLD = 0.5  # where no cell was scored, so no model said its own


@dataclass(frozen=True)
class Column:
    name: str
    type: str  # MLflow's schema type name (string, double, long)
    meaning: str


REQUEST = (Column("image", "string", "base64 of one encoded image: BMP, PNG, JPEG or TIFF"),)
CELL = (
    Column("label", "string", f"`{ALL}` or `{HEM}`: the call at `threshold` (`{ALL}` when `prob_all >= threshold`)"),
    Column("prob_all", "double", "P(ALL), temperature-scaled; the mean over the 8 D4 views where TTA is on"),
    Column("threshold", "double", "the decision threshold the model was released with"),
)
# What batch prediction and the patient route add around a cell's answer.
CELL_FILE = Column("path", "string", "the input file, as found")
CELL_NAME = Column("name", "string", "the cell's name in the request (default: cell 1, cell 2, ...)")
CELL_ERROR = Column("error", "string", "why the image could not be used (empty when it was scored)")
PERSON = (
    Column("subject", "string", "the person: from the C-NMC file name, `--subjects-csv`, `--subject` or the request"),
    Column("cells", "long", "readable cells that voted"),
    Column("unreadable", "long", "cells that could not be used"),
    Column("mean_prob_all", "double", "mean P(ALL) of the readable cells"),
    Column("ci95_low", "double", "2.5% bootstrap quantile of that mean over the person's cells"),
    Column("ci95_high", "double", "97.5% bootstrap quantile"),
    Column("share_called_all", "double", f"share of the readable cells labelled `{ALL}`"),
    Column(
        "call", "string", f"`{ALL}` or `{HEM}`: the person's call (`mean_prob_all >= threshold`); empty without a cell"
    ),
    Column("threshold", "double", "the cells' decision threshold"),
    Column("note", "string", "why the call is a guess or uncertain (too few cells, an interval across the threshold)"),
)

REQUEST_COLUMN = REQUEST[0].name
CELL_COLUMNS = [c.name for c in CELL]
PERSON_COLUMNS = [c.name for c in PERSON]
BATCH_COLUMNS = [CELL_FILE.name, *CELL_COLUMNS, CELL_ERROR.name]
PATIENT_CELL_COLUMNS = [CELL_NAME.name, *CELL_COLUMNS, CELL_ERROR.name]


def cell_answers(prob: np.ndarray, threshold: float) -> pd.DataFrame:
    """The served answer for P(ALL) values ``prob`` at ``threshold``: one row a cell."""
    return pd.DataFrame(
        {
            "label": np.where(prob >= threshold, ALL, HEM),
            "prob_all": prob,
            "threshold": np.full(len(prob), float(threshold)),
        },
        columns=CELL_COLUMNS,
    )


def cell_record(record: Mapping[str, Any]) -> dict[str, Any]:
    """A cell's answer in plain Python types (a CSV row, a JSON object)."""
    return {
        "label": str(record["label"]),
        "prob_all": float(record["prob_all"]),
        "threshold": float(record["threshold"]),
    }


def no_answer() -> dict[str, Any]:
    """A cell's row before (or without) an answer."""
    return dict.fromkeys([*CELL_COLUMNS, CELL_ERROR.name])


def threshold_of(cells: Iterable[Mapping[str, Any]]) -> float:
    """The threshold the scored cells were called at (one model, one threshold); the default where none was scored."""
    return next((float(c["threshold"]) for c in cells if c.get("threshold") is not None), DEFAULT_THRESHOLD)


def markdown_table(columns: Iterable[Column]) -> str:
    """The columns as a Markdown table, as the docs and the model card show them."""
    rows = [f"| `{c.name}` | {c.type} | {c.meaning} |" for c in columns]
    return "\n".join(["| column | type | meaning |", "|---|---|---|", *rows])
