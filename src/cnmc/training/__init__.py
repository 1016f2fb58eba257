"""The training loop (:class:`~cnmc.training.trainer.Trainer`), knowing nothing of MLflow, and what it is built from."""
