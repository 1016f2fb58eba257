"""Temperature scaling recovers a known over-confidence, ECE on hand-computed examples, and the
reliability diagram is written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import log_loss

from cnmc.inference.forward import prob_all
from cnmc.metrics.calibration import (
    T_MAX,
    T_MIN,
    expected_calibration_error,
    fit_temperature,
    nll,
    reliability_bins,
)
from cnmc.plots.evaluation import reliability_png


def overconfident(n: int = 20000, scale: float = 5.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels drawn from true P(ALL) = p, and the logits of a model that ranks perfectly but is
    ``scale`` times too confident: logits (0, scale * logit(p))."""
    rng = np.random.default_rng(seed)
    p = rng.uniform(0.02, 0.98, n)
    y = (rng.random(n) < p).astype(int)
    logits = np.stack([np.zeros(n), scale * np.log(p / (1 - p))], axis=1)
    return logits, y, p


def test_temperature_scaling_recovers_the_overconfidence_and_lowers_nll() -> None:
    logits, y, _ = overconfident()
    temperature = fit_temperature(logits, y)
    assert temperature == pytest.approx(5.0, rel=0.05)
    before, after = nll(logits, y), nll(logits, y, temperature)
    assert after < before - 0.1
    # The fitted T is the optimum: a step either way does worse.
    assert after <= min(nll(logits, y, temperature * 0.95), nll(logits, y, temperature * 1.05))
    raw, calibrated = prob_all(logits), prob_all(logits, temperature)
    assert expected_calibration_error(y, calibrated) < 0.02 < expected_calibration_error(y, raw)
    # Scaling never reorders: the argmax decision is the same before and after.
    np.testing.assert_array_equal(raw >= 0.5, calibrated >= 0.5)


def test_nll_is_the_log_loss_and_prob_all_averages_views() -> None:
    logits, y, _ = overconfident(n=500, scale=2.0, seed=1)
    assert nll(logits, y) == pytest.approx(log_loss(y, prob_all(logits)), rel=1e-9)
    assert nll(logits, y, 2.0) == pytest.approx(log_loss(y, prob_all(logits, 2.0)), rel=1e-9)
    views = np.stack([logits, logits / 3], axis=1)  # (N, V=2, 2)
    np.testing.assert_allclose(prob_all(views), (prob_all(logits) + prob_all(logits / 3)) / 2)


def test_a_well_calibrated_model_keeps_t_near_one_and_separable_data_keep_t_one() -> None:
    logits, y, _ = overconfident(scale=1.0, seed=2)
    assert fit_temperature(logits, y) == pytest.approx(1.0, rel=0.05)
    separable = np.array([[0.0, 3.0], [0.0, 2.0], [0.0, -2.0], [0.0, -4.0]])
    assert fit_temperature(separable, [1, 1, 0, 0]) == 1.0  # no temperature is supported
    one_error = np.array([[0.0, 3.0], [0.0, 2.0], [0.0, 0.5], [0.0, -2.0], [0.0, -4.0]])
    assert T_MIN < fit_temperature(one_error, [1, 1, 0, 0, 0]) < 1.0  # sharper, but finite
    assert T_MIN < fit_temperature(separable, [0, 1, 0, 1]) <= T_MAX
    with pytest.raises(ValueError, match="shape"):
        fit_temperature(np.zeros(4), [0, 1, 0, 1])
    with pytest.raises(ValueError, match="class indices"):
        fit_temperature(np.zeros((2, 2)), [0, 2])


def test_ece_known_values() -> None:
    # Confidences 0.9, 0.8 (right) | 0.7 (right), 0.6 (wrong): with 4 bins, bins (0.75, 1] and
    # (0.5, 0.75] hold two cells each, gaps |1 - 0.85| and |0.5 - 0.65|: ECE = 0.15.
    y, p = [1, 1, 0, 0], [0.9, 0.8, 0.3, 0.6]
    assert expected_calibration_error(y, p, n_bins=4) == pytest.approx(0.15)
    bins = reliability_bins(y, p, n_bins=4)
    np.testing.assert_array_equal(bins.count, [0, 0, 2, 2])
    np.testing.assert_allclose(bins.confidence[2:], [0.65, 0.85])
    np.testing.assert_allclose(bins.accuracy[2:], [0.5, 1.0])
    # One bin: |accuracy - confidence|. Confidence 0.95, half right: 0.45.
    assert expected_calibration_error([1, 1, 0, 0], [0.95] * 4) == pytest.approx(0.45)
    # P(ALL) 0.25 on 4 cells, one of them ALL: Hem predicted at confidence 0.75, right 3 times in 4.
    assert expected_calibration_error([1, 0, 0, 0], [0.25] * 4) == pytest.approx(0.0)
    assert expected_calibration_error([0], [1.0]) == pytest.approx(1.0)  # certain and wrong
    with pytest.raises(ValueError):
        expected_calibration_error([0, 1], [0.5])


def test_reliability_diagram_is_written(tmp_path: Path) -> None:
    logits, y, _ = overconfident(n=2000)
    out = reliability_png(
        y, prob_all(logits), prob_all(logits, 5.0), tmp_path / "plots" / "reliability.png", "test: before / after"
    )
    assert out == tmp_path / "plots" / "reliability.png"
    assert out.read_bytes()[:4] == b"\x89PNG" and out.stat().st_size > 5000
    assert not list(out.parent.glob(".*.tmp"))
