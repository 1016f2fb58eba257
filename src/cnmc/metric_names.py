"""Names of the scalar binary metrics and of their MLflow keys, for config checks and lookups.

Kept free of heavy imports so that ``params.yaml`` can be checked against it when it is loaded.
"""

SCALAR_METRICS = (
    "accuracy",
    "balanced_accuracy",
    "precision_all",
    "recall_all",
    "specificity",
    "f1_all",
    "precision_macro",
    "recall_macro",
    "f1_macro",
    "f1_weighted",
    "roc_auc",
)
# MLflow metric key prefixes of a run's evaluated model, at its reported threshold: the selected
# model on validation (per-epoch curves are ``val_*``) and on test.
MLFLOW_PREFIX = {"val": "final_val_", "test": "test_"}


def mlflow_key(split: str, metric: str) -> str:
    return f"{MLFLOW_PREFIX[split]}{metric}"
