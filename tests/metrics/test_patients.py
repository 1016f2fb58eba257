"""A call per person from known probabilities: mean, share, call, interval and the notes."""

from __future__ import annotations

import numpy as np
import pytest

from cnmc.inference.schema import PERSON_COLUMNS
from cnmc.metrics.patients import MIN_CELLS, call_people, call_person, people_evaluation


def test_a_person_is_called_by_the_mean_of_their_cells() -> None:
    row = call_person([0.9, 0.8, 0.7, 0.2, 0.9, 0.85], threshold=0.5)
    assert row["cells"] == 6 and row["mean_prob_all"] == pytest.approx(0.725)
    assert row["share_called_all"] == pytest.approx(5 / 6)
    assert row["call"] == "all" and row["note"] == ""
    assert 0.45 < row["ci95_low"] < row["mean_prob_all"] < row["ci95_high"] <= 0.9
    assert call_person([0.1, 0.2, 0.3, 0.4, 0.45], threshold=0.5)["call"] == "hem"
    assert call_person([0.5] * 5, threshold=0.5)["call"] == "all"  # at the threshold, as a cell is


def test_too_few_cells_and_an_interval_across_the_threshold_are_said() -> None:
    few = call_person([0.9, 0.95], threshold=0.5)
    assert few["call"] == "all" and f"fewer than {MIN_CELLS}: a guess" in few["note"]
    split = call_person([0.05, 0.95] * 5, threshold=0.5)
    assert split["ci95_low"] < 0.5 <= split["ci95_high"] and "spans the threshold" in split["note"]
    none = call_person([np.nan, np.nan], threshold=0.5, unreadable=2)
    assert (
        none["call"] == "none" and none["cells"] == 0 and none["unreadable"] == 2 and "no readable cell" in none["note"]
    )


def test_people_are_grouped_in_order_and_unreadable_cells_counted_not_voting() -> None:
    table = call_people(["b", "a", "b", "a", "b"], [0.9, 0.1, np.nan, 0.2, 0.8], threshold=0.5)
    assert list(table.columns) == PERSON_COLUMNS and list(table["subject"]) == ["b", "a"]
    b = table.iloc[0]
    assert (b["cells"], b["unreadable"], b["call"]) == (2, 1, "all") and b["mean_prob_all"] == pytest.approx(0.85)
    assert table.iloc[1]["call"] == "hem"


def test_people_evaluation_counts_people_right_with_an_exact_interval() -> None:
    subjects = ["p1"] * 5 + ["p2"] * 5 + ["h1"] * 5 + ["h2"] * 5
    targets = [1] * 10 + [0] * 10
    probs = [0.8] * 5 + [0.3] * 5 + [0.2] * 5 + [0.1] * 5  # p2 is missed
    result = people_evaluation(subjects, targets, probs, threshold=0.5, min_people_per_class=2)
    assert (result["people"], result["right"], result["accuracy"]) == (4, 3, 0.75)
    low, high = result["accuracy_ci95"]
    assert low == pytest.approx(0.1941, abs=1e-3) and high == pytest.approx(0.9937, abs=1e-3)  # Clopper-Pearson 3/4
    assert result["roc_auc"] == 1.0  # p2's mean (0.3) still above both donors'
    person = {row["subject"]: row for row in result["per_person"]}
    assert person["p2"]["label"] == "all" and person["p2"]["call"] == "hem" and not person["p2"]["right"]
    few = people_evaluation(subjects, targets, probs, threshold=0.5, min_people_per_class=3)
    assert few["roc_auc"] is None and "fewer than 3 people" in few["roc_auc_note"]


@pytest.mark.parametrize("field", ["subject", "names"])
def test_a_lone_surrogate_in_a_patient_request_is_a_400_not_a_traceback(field: str) -> None:
    from cnmc.serving.patient import PatientRequestError, parse_request

    value = '"\\ud800"' if field == "subject" else '["\\udfff"]'
    with pytest.raises(PatientRequestError, match=f"'{field}' holds a lone surrogate") as raised:
        parse_request(f'{{"images": ["aGk="], "{field}": {value}}}'.encode(), max_batch=8)
    assert raised.value.status == 400


def test_flagged_cells_do_not_vote_and_mostly_flagged_people_get_no_call() -> None:
    mixed = call_person([0.9, 0.8, 0.1, 0.95, 0.9, 0.85], 0.5, ood=[False] * 5 + [True])
    assert mixed["call"] == "all" and mixed["cells"] == 5 and mixed["cells_ood"] == 1
    assert "1 cell(s) unlike the training cells left out" in mixed["note"]
    mostly = call_person([0.9] * 6, 0.5, ood=[True] * 4 + [False] * 2)
    assert mostly["call"] == "none" and mostly["cells_ood"] == 4 and np.isnan(mostly["mean_prob_all"])
    assert "4 of 6 distinct readable cells are unlike the cells the model was trained on: no call" in mostly["note"]


def test_twenty_copies_of_one_cell_count_once() -> None:
    copies = call_person([0.9] * 20, 0.5, pixel_hashes=["a" * 16] * 20)
    assert copies["cells"] == 1 and copies["duplicates"] == 19
    assert "19 repeated image(s) counted once" in copies["note"] and "a guess" in copies["note"]
    table = call_people(["p"] * 3 + ["q"] * 2, [0.9, 0.9, 0.2, 0.9, 0.9], 0.5, pixel_hashes=["x", "x", "y", "x", "z"])
    assert list(table["duplicates"]) == [1, 0] and list(table["cells"]) == [2, 2]  # repeats within a person only
