"""A complete metrics document, as the evaluate stage writes it, for tests of what reads one."""

from __future__ import annotations

import json


def metrics_document(test: dict, **fields: object) -> dict:
    """A complete metrics document around one split evaluation (``test``, also used for TTA and
    validation), as the evaluate stage writes it; ``fields`` replace top-level values."""
    from cnmc.metrics.document import Calibration

    document = {
        "backbone": "fake",
        "run_id": "r",
        "weights": "random",
        "best_epoch": 7,
        "epochs_run": 12,
        "epoch_selection": "best validation macro F1",
        "stopped_early": True,
        "train_seconds": 61.5,
        "best_val_f1_macro": 0.8,
        "protocol": "subject",
        "data_hash": "hash-subject",
        "threshold": test["threshold"],
        "test": test,
        "test_tta": test,
        "calibration": dict.fromkeys(Calibration.model_fields, 1.0),
        "validation": {
            "can_judge": True,
            "reason": "enough cells",
            "n_all": 40,
            "n_hem": 40,
            "min_images_per_class": 30,
            "at_threshold": test["at_tuned"],
        },
    } | fields
    return json.loads(json.dumps(document))  # no shared sub-dicts: a test may change one part
