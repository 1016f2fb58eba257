"""The answer's columns are defined once (``cnmc.inference.schema``): the served frame, its logged
signature and the serving docs follow them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from mlflow.models import infer_signature

from cnmc.inference.schema import (
    CELL,
    CELL_COLUMNS,
    CELL_ERROR,
    CELL_FILE,
    CELL_NAME,
    PERSON,
    REQUEST,
    cell_answers,
    markdown_table,
    no_answer,
    threshold_of,
)

SERVING_DOC = Path(__file__).resolve().parents[2] / "docs" / "serving.md"


def test_the_answer_frame_has_the_columns_and_types_of_the_schema() -> None:
    frame = cell_answers(np.array([0.2, 0.5, 0.9]), 0.5)
    assert list(frame.columns) == CELL_COLUMNS and list(frame["label"]) == ["hem", "all", "all"]
    outputs = infer_signature(frame).inputs.to_dict()
    assert [(c["name"], c["type"]) for c in outputs] == [(c.name, c.type) for c in CELL]


def test_a_cell_without_an_answer_and_the_threshold_of_a_batch() -> None:
    assert no_answer() == dict.fromkeys([*CELL_COLUMNS, "error"])
    assert threshold_of([{"error": "x", "threshold": None}, {"threshold": 0.41}]) == 0.41
    assert threshold_of([{"error": "not an image", "threshold": None}]) == 0.5


def test_the_serving_docs_show_the_schema() -> None:
    doc = SERVING_DOC.read_text()
    for columns in (REQUEST, CELL, (CELL_FILE, CELL_ERROR), (CELL_NAME,), PERSON):
        assert markdown_table(columns) in doc
