"""The Table-2 comparison: paper rows beside ours, files written, bad inputs named."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers.documents import metrics_document

from cnmc.core.errors import CnmcError
from cnmc.jobs.report import build_report
from cnmc.metrics.scores import evaluate_split


def write_metrics(path: Path, backbone: str, protocol: str = "subject", seed: int = 0) -> dict:
    """A metrics file as the trainer writes it, from evaluate_split on synthetic predictions."""
    rng = np.random.default_rng(seed)
    y = (rng.random(300) < 2 / 3).astype(int)
    p = np.clip(0.4 * y + 0.6 * rng.random(300), 0, 1)
    test = evaluate_split(y, p, [f"s{i % 9}" for i in range(300)], val_threshold=0.45, n_boot=100)
    payload = metrics_document(test, backbone=backbone, protocol=protocol, data_hash=f"hash-{protocol}")
    path.write_text(json.dumps(payload))
    return payload


def test_report_puts_paper_rows_beside_ours(tmp_path: Path) -> None:
    b3 = write_metrics(tmp_path / "b3.json", "efficientnet_b3")
    write_metrics(tmp_path / "lite0.json", "tf_efficientnet_lite0", seed=1)
    report = build_report([tmp_path / "lite0.json", tmp_path / "b3.json"], tmp_path / "out")

    md = (tmp_path / "out" / "comparison.md").read_text()
    assert md == report.markdown and str(report) in md
    for paper_value in ("92.02", "91.36", "97.40", "94.30", "94.79"):
        assert paper_value in md
    ours = b3["test"]["at_0.5"]
    assert f"{ours['f1_all'] * 100:.2f}" in md and f"{ours['f1_macro'] * 100:.2f}" in md
    assert "ALL-class" in md and "subject-disjoint: test = unseen subjects" in md
    assert "| Model | Result | Accuracy | Precision (ALL) | Recall (ALL) | F1 (ALL) | ROC AUC |" in md
    # No empty "paper" row for a backbone the paper never ran.
    assert not [r for r in md.splitlines() if r.startswith("| tf_efficientnet_lite0 | paper")]
    assert md.index("| efficientnet_b3 |") < md.index("| tf_efficientnet_lite0 |")  # paper's first
    assert report.warnings == []

    table = pd.read_csv(tmp_path / "out" / "comparison.csv")
    assert {
        "protocol",
        "backbone",
        "result",
        "threshold",
        "accuracy",
        "precision_all",
        "recall_all",
        "f1_all",
        "roc_auc",
        "f1_macro",
        "balanced_accuracy",
        "f1_all_ci_low",
        "f1_all_ci_high",
        "data_hash",
        "best_epoch",
        "metrics_file",
    } <= set(table.columns)
    assert len(table) == 7  # b3: the paper, ours at 0.5, tuned, with TTA; lite0 (not in the paper): ours only
    tuned = table[(table["backbone"] == "efficientnet_b3") & (table["threshold"] == 0.45)].iloc[0]
    assert tuned["f1_all"] == round(b3["test"]["at_tuned"]["f1_all"] * 100, 2)

    png = tmp_path / "out" / "comparison.png"
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"


def test_mixed_protocols_are_grouped_and_warned(tmp_path: Path) -> None:
    write_metrics(tmp_path / "a.json", "efficientnet_b3", protocol="paper")
    write_metrics(tmp_path / "b.json", "efficientnet_b3", protocol="subject")
    report = build_report([tmp_path / "a.json", tmp_path / "b.json"], tmp_path / "out")
    assert any("mixed protocols" in w for w in report.warnings)
    md = report.markdown
    assert md.index("Protocol `subject`") < md.index("Protocol `paper`")
    assert "subjects shared — optimistic" in md and "**Warning:** mixed protocols" in md


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "cannot read"),
        ("[1, 2]", "JSON object"),
        (json.dumps({"backbone": "resnet50"}), "run_id: Field required"),
    ],
)
def test_bad_metrics_file_is_named(tmp_path: Path, content: str, message: str) -> None:
    bad = tmp_path / "broken.json"
    bad.write_text(content)
    with pytest.raises(CnmcError, match=message) as err:
        build_report([bad], tmp_path / "out")
    assert "broken.json" in str(err.value)


def test_missing_file_and_bad_metric_are_named(tmp_path: Path) -> None:
    with pytest.raises(CnmcError, match="absent.json"):
        build_report([tmp_path / "absent.json"], tmp_path / "out")
    payload = write_metrics(tmp_path / "m.json", "resnet50")
    payload["test"]["at_tuned"]["f1_all"] = "high"
    (tmp_path / "m.json").write_text(json.dumps(payload))
    with pytest.raises(CnmcError, match="m.json: test.at_tuned.f1_all: Input should be a valid number"):
        build_report([tmp_path / "m.json"], tmp_path / "out")
    with pytest.raises(CnmcError, match="no metrics files"):
        build_report([], tmp_path / "out")


def test_tta_rows_and_calibration_table(tmp_path: Path) -> None:
    payload = write_metrics(tmp_path / "b3.json", "efficientnet_b3")
    rng = np.random.default_rng(5)
    y = (rng.random(300) < 2 / 3).astype(int)
    p = np.clip(0.45 * y + 0.55 * rng.random(300), 0, 1)
    payload["test_tta"] = evaluate_split(y, p, [f"s{i % 9}" for i in range(300)], 0.45, n_boot=50)
    payload["calibration"] |= {
        "temperature": 1.84,
        "test_ece_before": 0.1234,
        "test_ece_after": 0.0456,
        "test_nll_before": 0.61,
        "test_nll_after": 0.42,
    }
    (tmp_path / "b3.json").write_text(json.dumps(payload))
    report = build_report([tmp_path / "b3.json"], tmp_path / "out")

    md = report.markdown
    tta_rows = [r for r in md.splitlines() if r.startswith("| efficientnet_b3 | ours + TTA, t=0.45 (val-tuned)")]
    assert len(tta_rows) == 1
    assert f"{payload['test_tta']['at_tuned']['f1_all'] * 100:.2f}" in tta_rows[0]
    assert md.index("(val-tuned) |") < md.index("ours + TTA")  # right under the plain tuned row
    assert "| efficientnet_b3 | 1.840 | 0.123 | 0.046 | 0.610 | 0.420 |" in md
    table = pd.read_csv(tmp_path / "out" / "comparison.csv")
    assert len(table) == 4 and table["tta"].tolist() == [False, False, False, True]
    row = table[table["tta"]].iloc[0]
    assert row["f1_all"] == round(payload["test_tta"]["at_tuned"]["f1_all"] * 100, 2)

    payload["test_tta"]["at_tuned"]["f1_all"] = "high"
    (tmp_path / "b3.json").write_text(json.dumps(payload))
    with pytest.raises(CnmcError, match="test_tta.at_tuned.f1_all: Input should be a valid number"):
        build_report([tmp_path / "b3.json"], tmp_path / "out")


def test_a_run_whose_validation_could_not_judge_is_labelled_so(tmp_path: Path) -> None:
    payload = write_metrics(tmp_path / "lite0.json", "tf_efficientnet_lite0")
    reason = "validation holds 1165 ALL and 5 Hem cells, fewer than split.min_images_per_class = 30 of each"
    payload["threshold"] = 0.5
    payload["validation"] |= {"can_judge": False, "reason": reason}
    (tmp_path / "lite0.json").write_text(json.dumps(payload))
    md = build_report([tmp_path / "lite0.json"], tmp_path / "out").markdown
    assert "ours, t=0.50 (not tuned: validation too small)" in md and "val-tuned" not in md
    assert "| ours, t=0.50 |" not in md  # at 0.5 the plain row would repeat the row above
    assert f"**Nothing fitted** ({reason})" in md and "holdout validation" in md


def test_the_demo_data_is_named_as_a_small_subset(tmp_path: Path) -> None:
    from cnmc.data.demo import DEMO_DATA_HASH

    payload = write_metrics(tmp_path / "lite0.json", "tf_efficientnet_lite0") | {"data_hash": DEMO_DATA_HASH}
    (tmp_path / "lite0.json").write_text(json.dumps(payload))
    md = build_report([tmp_path / "lite0.json"], tmp_path / "out").markdown
    assert "**demo data**: the demo subset shipped with the project" in md
    assert "wide" in md and "no claim about the full data set" in md
