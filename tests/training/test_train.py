"""The training loop (cnmc.training.trainer.Trainer) on the tiny store: history and best weights, early
stopping, exact resume after an interruption, refused checkpoints, SIGTERM, a diverging loss."""

from __future__ import annotations

import copy
import os
import signal
import time

import numpy as np
import pytest
import torch
from helpers.trainers import make_trainer

from cnmc.core.errors import CnmcError
from cnmc.training import trainer as train_module
from cnmc.training.trainer import Trainer, sigterm_as_interrupt

HISTORY_KEYS = {"epoch", "train_loss", "val_loss", "val_f1_macro", "val_roc_auc"}


def script_val_f1(monkeypatch: pytest.MonkeyPatch, values: list[float], losses: list[float] | None = None) -> None:
    """Make the validation macro F1 (and, with ``losses``, the validation loss) of successive
    epochs the given values (the rest stays real), so the early-stopping logic is tested
    independently of what a tiny net happens to learn."""
    real, scripted = train_module.binary_metrics, iter(values)

    def fake(y_true, prob_all, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        return {**real(y_true, prob_all, *args, **kwargs), "f1_macro": next(scripted)}

    monkeypatch.setattr(train_module, "binary_metrics", fake)
    if losses is not None:
        real_predict, scripted_loss = Trainer.predict, iter(losses)

        def fake_predict(self, dataset):  # noqa: ANN001, ANN202
            return real_predict(self, dataset)[0], next(scripted_loss)

        monkeypatch.setattr(Trainer, "predict", fake_predict)


def states_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_fit_runs_every_epoch_and_ends_with_the_best_weights(tiny_store, tmp_path, monkeypatch):
    script_val_f1(monkeypatch, [0.5, 0.8, 0.6])
    checkpoint = tmp_path / "ckpt" / "checkpoint.pt"
    trainer = make_trainer(tiny_store, checkpoint, epochs=3, patience=5)
    snapshots, rows = [], []

    def on_epoch(row: dict[str, float]) -> None:
        rows.append(row)
        snapshots.append(copy.deepcopy(trainer.model.state_dict()))

    result = trainer.fit(on_epoch=on_epoch)

    assert [row["epoch"] for row in result.history] == [1, 2, 3]
    assert rows == result.history
    for row in result.history:
        assert set(row) == HISTORY_KEYS
        assert row["train_loss"] > 0 and row["val_loss"] > 0
        assert 0.0 <= row["val_roc_auc"] <= 1.0
    assert [row["val_f1_macro"] for row in result.history] == [0.5, 0.8, 0.6]
    assert result.best_epoch == 2 and result.best_val_f1_macro == 0.8
    assert not result.stopped_early
    assert result.seconds > 0
    # The model ends with epoch 2's weights, not the last epoch's.
    assert states_equal(trainer.model.state_dict(), snapshots[1])
    assert states_equal(result.best_state, snapshots[1])
    assert not states_equal(snapshots[1], snapshots[2])
    saved = torch.load(checkpoint, weights_only=True)
    assert saved["next_epoch"] == 3 and saved["best_epoch"] == 2 and saved["bad_epochs"] == 1
    assert states_equal(saved["model"], snapshots[2])


def test_early_stopping_stops_after_patience_epochs_without_improvement(tiny_store, tmp_path, monkeypatch):
    # Nothing improves after epoch 1 (TrainConfig refuses lr=0, and batch-norm statistics move even
    # then, so the metric is scripted): with patience 1, epoch 2 is the last.
    script_val_f1(monkeypatch, [0.6, 0.6, 0.6, 0.6], losses=[0.5, 0.5, 0.4, 0.3])
    trainer = make_trainer(tiny_store, tmp_path / "checkpoint.pt", epochs=4, patience=1)
    result = trainer.fit()
    assert len(result.history) == 2
    assert result.stopped_early
    assert result.best_epoch == 1


def test_a_validation_set_too_small_to_judge_trains_every_epoch_and_keeps_the_last(tiny_store, tmp_path, monkeypatch):
    # The scripted F1 peaks at epoch 1, which early stopping would keep; a validation set with
    # fewer than min_val_per_class cells of a class may not choose.
    script_val_f1(monkeypatch, [0.9, 0.5, 0.5, 0.5], losses=[0.1, 0.5, 0.5, 0.5])
    trainer = make_trainer(tiny_store, tmp_path / "checkpoint.pt", epochs=4, patience=1, min_val_per_class=30)
    result = trainer.fit()
    assert len(result.history) == 4 and not result.stopped_early and result.best_epoch == 4
    assert result.selection.startswith("last epoch, no early stopping: validation holds")
    assert "fewer than split.min_images_per_class = 30 of each" in result.selection


def test_equal_f1_with_a_lower_validation_loss_is_an_improvement(tiny_store, tmp_path, monkeypatch):
    # F1 ties for four epochs; the loss falls at epochs 2 and 4 only, rises at epoch 3, and
    # epoch 5's higher F1 wins over any loss.
    script_val_f1(monkeypatch, [0.7, 0.7, 0.7, 0.7, 0.8], losses=[0.5, 0.4, 0.45, 0.3, 0.9])
    trainer = make_trainer(tiny_store, tmp_path / "checkpoint.pt", epochs=5, patience=2)
    seen: list[int] = []
    result = trainer.fit(on_epoch=lambda row: seen.append(int(row["epoch"])))
    assert seen == [1, 2, 3, 4, 5] and not result.stopped_early
    assert result.best_epoch == 5 and result.best_val_f1_macro == 0.8 and result.best_val_loss == 0.9
    monkeypatch.undo()  # a fresh script for a second run that ends on a tie with a lower loss
    trainer = make_trainer(tiny_store, tmp_path / "other.pt", epochs=4, patience=2)
    script_val_f1(monkeypatch, [0.7, 0.7, 0.7, 0.7], losses=[0.5, 0.4, 0.45, 0.3])
    assert trainer.fit().best_epoch == 4


def test_resume_after_sigterm_matches_an_uninterrupted_run(tiny_store, tmp_path):
    # A random train-time transform (the paper's T): its draws must match after the resume too.
    settings = {"epochs": 3, "patience": 5, "transform": True}
    straight = make_trainer(tiny_store, tmp_path / "a" / "checkpoint.pt", **settings)
    expected = straight.fit()
    expected_final = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)

    checkpoint = tmp_path / "b" / "checkpoint.pt"
    interrupted = make_trainer(tiny_store, checkpoint, **settings)
    original_handler = signal.getsignal(signal.SIGTERM)

    def kill_after_first_epoch(row: dict[str, float]) -> None:
        handler = signal.getsignal(signal.SIGTERM)
        assert callable(handler) and handler is not original_handler, "fit must trap SIGTERM"
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler interrupts this at once

    with pytest.raises(KeyboardInterrupt):
        interrupted.fit(on_epoch=kill_after_first_epoch)
    assert signal.getsignal(signal.SIGTERM) is original_handler
    assert torch.load(checkpoint, weights_only=True)["next_epoch"] == 1

    # Other settings or data: the checkpoint is refused, not silently mixed in.
    with pytest.raises(CnmcError, match="other settings or data"):
        make_trainer(tiny_store, checkpoint, fingerprint="other", **settings).fit(resume=True)

    # Different random initial weights: all that matters must come from the checkpoint.
    resumed_trainer = make_trainer(tiny_store, checkpoint, init_seed=123, **settings)
    replayed: list[dict[str, float]] = []
    resumed = resumed_trainer.fit(resume=True, on_epoch=replayed.append)

    assert resumed.history == expected.history
    assert replayed == expected.history  # epoch 1 replayed for trackers, then epochs 2 and 3
    assert resumed.best_epoch == expected.best_epoch
    assert resumed.best_val_f1_macro == expected.best_val_f1_macro
    assert resumed.stopped_early == expected.stopped_early
    assert states_equal(resumed_trainer.model.state_dict(), straight.model.state_dict())
    final = torch.load(checkpoint, weights_only=True)
    assert states_equal(final["model"], expected_final["model"])  # last epoch's weights, exactly
    assert states_equal(final["best_state"], expected_final["best_state"])
    assert final["optimizer"]["state"].keys() == expected_final["optimizer"]["state"].keys()
    for key, state in final["optimizer"]["state"].items():
        assert states_equal(state, expected_final["optimizer"]["state"][key])


def test_resume_without_a_checkpoint_starts_from_scratch(tiny_store, tmp_path, caplog):
    trainer = make_trainer(tiny_store, tmp_path / "none" / "checkpoint.pt", epochs=1)
    with caplog.at_level("WARNING", logger="cnmc.training.trainer"):
        result = trainer.fit(resume=True)
    assert len(result.history) == 1
    assert "no checkpoint" in caplog.text


def test_an_unreadable_checkpoint_is_a_clear_error(tiny_store, tmp_path):
    checkpoint = tmp_path / "checkpoint.pt"
    checkpoint.write_bytes(b"not a checkpoint")
    with pytest.raises(CnmcError, match="unreadable checkpoint"):
        make_trainer(tiny_store, checkpoint).fit(resume=True)


def test_sigterm_becomes_keyboard_interrupt_and_the_handler_is_restored():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt), sigterm_as_interrupt():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # interrupted by the handler
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_diverging_loss_stops_training(tiny_store, tmp_path):
    trainer = make_trainer(tiny_store, tmp_path / "checkpoint.pt")
    real_loss = trainer.loss_fn
    trainer.loss_fn = lambda logits, targets: real_loss(logits, targets) * float("nan")
    with pytest.raises(FloatingPointError, match="epoch 1"):
        trainer.fit()
    assert not (tmp_path / "checkpoint.pt").exists()


def test_compile_that_fails_here_warns_and_trains_eagerly(tiny_store, tmp_path, monkeypatch, caplog):
    """train.compile: where torch.compile cannot work (no compiler, an unsupported op) training goes on."""

    def broken(module):  # noqa: ANN001, ANN202 - stands in for torch.compile on a machine it fails on
        def call(*args):  # noqa: ANN002, ANN202
            raise RuntimeError("inductor: no C++ compiler found\ndetails...")

        return call

    monkeypatch.setattr(torch, "compile", broken)
    trainer = make_trainer(tiny_store, tmp_path, compile=True)
    with caplog.at_level("WARNING"):
        loss = trainer.train_epoch(0)
    assert np.isfinite(loss)
    assert (
        "torch.compile failed here (RuntimeError: inductor: no C++ compiler found): training without it" in caplog.text
    )


def test_predict_scores_the_stored_images_whatever_dataset_view_it_is_given(tiny_store, tmp_path):
    from cnmc.data.store import StoreDataset

    trainer = make_trainer(tiny_store, tmp_path / "c.pt")
    plain, loss = trainer.predict(trainer.val_ds)
    normalised, same_loss = trainer.predict(StoreDataset(trainer.val_ds.store, trainer.mean, trainer.std))
    np.testing.assert_array_equal(plain, normalised)
    assert loss == same_loss and plain.shape == (len(trainer.val_ds),)
