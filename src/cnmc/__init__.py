"""C-NMC 2019 leukemia cell classification: a reproducible DVC + MLflow pipeline."""

__version__ = "0.1.0"
