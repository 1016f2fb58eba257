"""Figures: the evaluation plots and the training curves."""
