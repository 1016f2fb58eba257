"""Judging predictions: the metric catalogue and its maths, calibration, threshold rules,
per-person calls, the metrics document."""
