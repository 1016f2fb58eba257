"""Metrics against hand-computed values and the paper's B3 numbers; threshold, bootstrap, plots."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pandas as pd
import pytest

from cnmc.core.metric_catalogue import metric_names
from cnmc.metrics.scores import (
    binary_metrics,
    bootstrap_ci,
    evaluate_split,
    per_subject_accuracy,
    tune_threshold,
)
from cnmc.plots import evaluation as plots
from cnmc.plots.training import training_curves_png

# Tiny example: at 0.5 the predictions are [1, 1, 0, 1, 0] -> TP 2, FN 1, FP 1, TN 1.
Y = [1, 1, 1, 0, 0]
P = [0.9, 0.6, 0.4, 0.7, 0.2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def noisy(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labels (about 2/3 ALL, like C-NMC) and overlapping probabilities."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 2 / 3).astype(int)
    return y, np.clip(0.35 * y + 0.65 * rng.random(n), 0, 1)


def paper_b3() -> tuple[np.ndarray, np.ndarray]:
    """The paper's B3 test set as its accuracy and recall imply: TP 825, FN 22, FP 78, TN 328."""
    y = np.array([1] * 847 + [0] * 406)
    p = np.array([0.9] * 825 + [0.1] * 22 + [0.9] * 78 + [0.1] * 328)
    return y, p


def test_binary_metrics_match_hand_computed_values() -> None:
    m = binary_metrics(Y, P)
    expected = {
        "accuracy": 3 / 5,
        "balanced_accuracy": 7 / 12,
        "specificity": 1 / 2,
        "precision_all": 2 / 3,
        "recall_all": 2 / 3,
        "f1_all": 2 / 3,
        "precision_macro": 7 / 12,
        "recall_macro": 7 / 12,
        "f1_macro": 7 / 12,
        "precision_weighted": 3 / 5,
        "recall_weighted": 3 / 5,
        "f1_weighted": 3 / 5,
        "roc_auc": 4 / 6,
    }
    for name, value in expected.items():
        assert m[name] == pytest.approx(value), name
    assert (m["n"], m["n_all"], m["n_hem"]) == (5, 3, 2)
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (2, 1, 1, 1)


def test_threshold_is_inclusive_and_moves_predictions() -> None:
    assert binary_metrics(Y, P, threshold=0.6)["tp"] == 2
    assert binary_metrics(Y, P, threshold=0.3)["tp"] == 3


def test_paper_b3_numbers_are_all_class_binary_metrics() -> None:
    m = binary_metrics(*paper_b3())
    assert round(m["accuracy"] * 100, 2) == 92.02
    assert round(m["precision_all"] * 100, 2) == 91.36
    assert round(m["recall_all"] * 100, 2) == 97.40
    # 2*825 / (2*825 + 78 + 22) = 94.2857%: the paper prints 94.30, 0.01 off its own counts.
    assert round(m["f1_all"] * 100, 2) == 94.29
    assert m["f1_all"] * 100 == pytest.approx(94.30, abs=0.02)
    assert m["f1_macro"] * 100 == pytest.approx(90.5, abs=0.05)


def test_one_class_gives_nan_auc_without_crash_or_warning() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = binary_metrics([1, 1, 1], [0.9, 0.2, 0.7])
    assert math.isnan(m["roc_auc"])
    assert m["accuracy"] == pytest.approx(2 / 3)
    assert m["balanced_accuracy"] == pytest.approx(2 / 3)


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="equally long"):
        binary_metrics([0, 1], [0.5])
    with pytest.raises(ValueError, match="0 \\(Hem\\) or 1"):
        binary_metrics([0, 0.5], [0.5, 0.5])


def test_per_subject_accuracy_and_mean() -> None:
    subjects = ["a", "a", "b", "H1", "H1"]
    per = per_subject_accuracy(Y, P, subjects, 0.5)
    assert list(per) == ["H1", "a", "b"]
    assert per["a"] == {"n": 2, "label": "all", "accuracy": 1.0}
    assert per["b"] == {"n": 1, "label": "all", "accuracy": 0.0}
    assert per["H1"] == {"n": 2, "label": "hem", "accuracy": 0.5}
    m = binary_metrics(Y, P, subjects=subjects)
    assert m["n_subjects"] == 3
    assert m["mean_subject_accuracy"] == pytest.approx(0.5)


def test_tune_threshold_separates_a_separable_example() -> None:
    y = [0, 0, 0, 1, 1, 1]
    p = [0.1, 0.2, 0.3, 0.35, 0.4, 0.45]  # 0.5 calls everything Hem
    t = tune_threshold(y, p)
    assert 0.3 < t < 0.35
    assert binary_metrics(y, p, t)["f1_macro"] == 1.0


def test_tune_threshold_never_worse_than_half_and_ties_go_to_half() -> None:
    for seed in range(5):
        y, p = noisy(300, seed)
        t = tune_threshold(y, p)
        assert binary_metrics(y, p, t)["f1_macro"] >= binary_metrics(y, p, 0.5)["f1_macro"]
    assert tune_threshold([0, 0, 1, 1], [0.1, 0.2, 0.9, 0.95]) == 0.5  # 0.55 is as good
    assert tune_threshold([1, 1], [0.2, 0.3]) == 0.5  # one class: nothing to tune


def test_bootstrap_ci_contains_estimate_and_narrows_with_n() -> None:
    widths = {}
    for n in (200, 2000):
        y, p = noisy(n)
        point = binary_metrics(y, p)
        ci = bootstrap_ci(y, p, 0.5, metric_names(), n_boot=500, seed=1)  # every metric has an interval
        for name, (low, high) in ci.items():
            assert low <= point[name] <= high, (n, name)
        widths[n] = ci["f1_all"][1] - ci["f1_all"][0]
    assert widths[2000] < widths[200] / 2
    assert bootstrap_ci(*noisy(200), 0.5, ["roc_auc"], n_boot=50, seed=3) == bootstrap_ci(
        *noisy(200), 0.5, ["roc_auc"], n_boot=50, seed=3
    )


def test_bootstrap_refuses_unknown_metrics() -> None:
    y, p = noisy(200)
    with pytest.raises(ValueError, match="no bootstrap"):
        bootstrap_ci(y, p, 0.5, ["log_loss"])


def test_evaluate_split_reports_both_thresholds() -> None:
    y, p = noisy(120)
    subjects = [f"s{i % 7}" for i in range(120)]
    out = evaluate_split(y, p, subjects, val_threshold=0.4, n_boot=50)
    assert out["threshold"] == 0.4
    assert out["at_0.5"] == binary_metrics(y, p, 0.5, subjects)
    assert out["at_tuned"] == binary_metrics(y, p, 0.4, subjects)
    assert set(out["per_subject"]) == {f"s{i}" for i in range(7)}
    low, high = out["ci95"]["at_tuned"]["f1_all"]
    assert low <= out["at_tuned"]["f1_all"] <= high
    json.dumps(out)  # what the trainer writes must serialise
    assert "ci95" not in evaluate_split(y, p, subjects, 0.4, n_boot=0)


def is_png(path) -> bool:
    return path.is_file() and path.stat().st_size > 1000 and path.read_bytes()[:8] == PNG_MAGIC


def test_plots_write_pngs_and_dvc_data(tmp_path) -> None:
    y, p = noisy(200)
    pred = (p >= 0.5).astype(int)
    assert is_png(plots.confusion_matrix_png(y, pred, tmp_path / "cm.png", "Test"))
    assert is_png(plots.roc_png(y, p, tmp_path / "roc.png", "Test"))
    assert is_png(plots.roc_png([1, 1], [0.2, 0.9], tmp_path / "roc1.png", "One class"))
    history = [
        {
            "epoch": e,
            "train_loss": 1 / e,
            "val_loss": 1.2 / e,
            "val_f1_macro": 0.5 + 0.04 * e,
            "val_roc_auc": 0.6 + 0.03 * e,
        }
        for e in range(1, 8)
    ]
    assert is_png(training_curves_png(history, tmp_path / "curves.png"))
    table = pd.DataFrame(
        [
            {
                "backbone": "efficientnet_b3",
                "result": "paper",
                "accuracy": 92.02,
                "precision_all": 91.36,
                "recall_all": 97.4,
                "f1_all": 94.3,
                "roc_auc": 94.79,
            },
            {
                "backbone": "efficientnet_b3",
                "result": "ours",
                "accuracy": 88.0,
                "precision_all": 90.0,
                "recall_all": 92.0,
                "f1_all": 91.0,
                "roc_auc": float("nan"),
            },
        ]
    )
    assert is_png(plots.metric_bars_png(table, tmp_path / "bars.png", "Test"))

    cm = json.loads(plots.confusion_matrix_json(y, pred, tmp_path / "cm.json").read_text())
    m = binary_metrics(y, p)
    assert cm["labels"] == ["hem", "all"]
    assert cm["matrix"] == [[m["tn"], m["fp"]], [m["fn"], m["tp"]]]
    assert len(cm["rows"]) == 200
    assert sum(r == {"actual": "all", "predicted": "hem"} for r in cm["rows"]) == m["fn"]

    roc = pd.read_csv(plots.roc_csv(y, p, tmp_path / "roc.csv"))
    assert list(roc.columns) == ["fpr", "tpr", "threshold"]
    assert roc[["fpr", "tpr"]].iloc[-1].tolist() == [1.0, 1.0]


def test_subject_bootstrap_resamples_whole_subjects_and_is_wider_than_the_cell_one() -> None:
    rng = np.random.default_rng(3)
    # Ten subjects of 40 cells; each subject's cells share one offset, so cells are correlated.
    subjects = np.repeat([f"s{k}" for k in range(10)], 40)
    y = np.repeat([1, 0] * 5, 40)
    offset = np.repeat(rng.normal(0, 0.25, 10), 40)
    p = np.clip(0.35 + 0.3 * y + offset + rng.normal(0, 0.05, 400), 0, 1)
    cells = bootstrap_ci(y, p, 0.5, ("accuracy",), n_boot=400, seed=0)["accuracy"]
    people = bootstrap_ci(y, p, 0.5, ("accuracy",), n_boot=400, seed=0, groups=subjects)["accuracy"]
    assert people[1] - people[0] > 2 * (cells[1] - cells[0])
    # One group per cell is the cell bootstrap.
    same = bootstrap_ci(y, p, 0.5, ("accuracy",), n_boot=400, seed=0, groups=[str(i) for i in range(400)])
    assert same["accuracy"] == pytest.approx(cells, abs=0.02)
    with pytest.raises(ValueError, match="one group per cell"):
        bootstrap_ci(y, p, 0.5, ("accuracy",), groups=subjects[:10])
