"""Data half of the pipeline: layouts and manifest, splits, augmentation, demo data."""
