"""Judging predictions: metric maths, calibration, threshold rules, per-person calls, the metrics document.

The catalogue of metric names, which settings may name, is :mod:`cnmc.core.metric_catalogue`.
"""
