"""The answer a model gives, defined once: for a cell (the served pyfunc, ``cnmc predict``, the
patient route) and for a person (:mod:`cnmc.metrics.patients`).

Each column has a name, a type and a meaning; the pyfunc's logged signature, the batch CSV, the
patient JSON, the model card and ``docs/serving.md`` are built from or checked against these.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from cnmc.inference.familiarity import gated_score

ALL, HEM = "all", "hem"
NONE = "none"  # a person's call where the cells cannot carry one
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
    Column(
        "ood_score",
        "double",
        "how unlike the model's training cells: distance over the model's cut-off (above 1 is flagged; "
        "empty for a model logged without one)",
    ),
    Column(
        "ood",
        "boolean",
        "true where the cell is not one to judge: `ood_score` above 1, or the image failed the quality gate",
    ),
    Column("ood_reason", "string", "why the cell is flagged (empty when it is not)"),
    Column(
        "pixel_hash",
        "string",
        "SHA-256 of the decoded pixels (16 hex digits): copies of one image, renamed or re-encoded "
        "without loss, share it",
    ),
)
# What batch prediction and the patient route add around a cell's answer.
CELL_FILE = Column("path", "string", "the input file, as found")
CELL_NAME = Column("name", "string", "the cell's name in the request (default: cell 1, cell 2, ...)")
CELL_ERROR = Column("error", "string", "why the image could not be used (empty when it was scored)")
PERSON = (
    Column("subject", "string", "the person: from the C-NMC file name, `--subjects-csv`, `--subject` or the request"),
    Column("cells", "long", "readable cells that voted: not flagged `ood`, each distinct image once"),
    Column("unreadable", "long", "cells that could not be used"),
    Column("cells_ood", "long", "readable cells flagged `ood`: they do not vote"),
    Column("duplicates", "long", "readable cells whose pixels repeat another cell of the person: counted once"),
    Column("mean_prob_all", "double", "mean P(ALL) of the readable cells"),
    Column("ci95_low", "double", "2.5% bootstrap quantile of that mean over the person's cells"),
    Column("ci95_high", "double", "97.5% bootstrap quantile"),
    Column("share_called_all", "double", f"share of the readable cells labelled `{ALL}`"),
    Column(
        "call",
        "string",
        f"`{ALL}` or `{HEM}`: the person's call (`mean_prob_all >= threshold`); `{NONE}` where no cell, or mostly "
        "flagged cells, can vote",
    ),
    Column("threshold", "double", "the cells' decision threshold"),
    Column(
        "note",
        "string",
        "why the call is a guess, uncertain or missing (too few cells, an interval across the threshold, "
        "cells left out as flagged or repeated)",
    ),
)

REQUEST_COLUMN = REQUEST[0].name
CELL_COLUMNS = [c.name for c in CELL]
PERSON_COLUMNS = [c.name for c in PERSON]
BATCH_COLUMNS = [CELL_FILE.name, *CELL_COLUMNS, CELL_ERROR.name]
PATIENT_CELL_COLUMNS = [CELL_NAME.name, *CELL_COLUMNS, CELL_ERROR.name]


def cell_answers(
    prob: np.ndarray,
    threshold: float,
    ood_score: np.ndarray | None = None,
    problems: Sequence[str] | None = None,
    pixel_hashes: Sequence[str] | None = None,
) -> pd.DataFrame:
    """The served answer for P(ALL) values ``prob`` at ``threshold``: one row a cell; ``ood_score``
    (None: the model has no familiarity; raised to the gate's floor where the quality gate flags the
    cell, :func:`cnmc.inference.familiarity.gated_score`), the quality gate's ``problems`` ("" for
    none) and the decoded pixels' hashes where known."""
    n = len(prob)
    problems = list(problems) if problems is not None else [""] * n
    features_score = np.full(n, np.nan) if ood_score is None else np.asarray(ood_score, dtype=np.float64)
    score = gated_score(features_score, np.array([bool(p) for p in problems], dtype=bool))
    reasons = [problem or (UNFAMILIAR if s > 1 else "") for problem, s in zip(problems, score, strict=True)]
    return pd.DataFrame(
        {
            "label": np.where(prob >= threshold, ALL, HEM),
            "prob_all": prob,
            "threshold": np.full(n, float(threshold)),
            "ood_score": score,
            "ood": np.array([bool(r) for r in reasons], dtype=bool),
            "ood_reason": reasons,
            "pixel_hash": list(pixel_hashes) if pixel_hashes is not None else [""] * n,
        },
        columns=CELL_COLUMNS,
    )


UNFAMILIAR = "unlike the cells the model was trained on (ood_score above 1)"


def cell_record(record: Mapping[str, Any]) -> dict[str, Any]:
    """A cell's answer in plain Python types (a CSV row, a JSON object). A model logged before the
    familiarity columns answers without them: no score (None), not flagged, no hash."""
    score = record.get("ood_score")
    return {
        "label": str(record["label"]),
        "prob_all": float(record["prob_all"]),
        "threshold": float(record["threshold"]),
        "ood_score": None if score is None or np.isnan(float(score)) else float(score),
        "ood": bool(record.get("ood") or False),
        "ood_reason": str(record.get("ood_reason") or ""),
        "pixel_hash": str(record.get("pixel_hash") or ""),
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
