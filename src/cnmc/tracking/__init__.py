"""MLflow: one run context for every run, provenance tags, and the model registry (promotion, aliases)."""
