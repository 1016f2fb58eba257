"""Optuna tuning (cnmc.jobs.tune, its study in tune_study, its trials in tune_trial) on the tiny store:
a tracked study and tuned.yaml, pruning (in SQLite), a failed trial that does not stop the study,
resuming, two concurrent `cnmc tune` workers on one journal file, and the store view that replays
the augment stage's balancing with T on the fly."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
import yaml
from optuna.trial import TrialState

from cnmc.core.config import Params
from cnmc.core.errors import CnmcError
from cnmc.data.store import ImageStore
from cnmc.jobs import tune, tune_study, tune_trial
from cnmc.training import trainer as train_module

STUDY = "tiny-tune"


def tune_params(tmp_path: Path, **tune_cfg: object) -> Params:
    raw = Params().model_dump()
    raw["train"] |= {"pretrained": False, "device": "cpu", "batch_size": 16, "num_workers": 0}
    raw["tune"] |= {
        "backbone": "test_resnet",
        "epochs": 1,
        "n_trials": 3,
        "study_name": STUDY,
        "storage": f"journal:{tmp_path / 'optuna-journal.log'}",
        **tune_cfg,
    }
    return Params.model_validate(raw)


def load(params: Params) -> optuna.Study:
    return optuna.load_study(study_name=STUDY, storage=tune_study.make_storage(params.tune.storage))


def child_runs(parent_id: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    exp = client.get_run(parent_id).info.experiment_id
    return client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent_id}'")


def test_study_is_tracked_and_writes_tuned_params(tiny_store, mlflow_db, tmp_path):
    from mlflow.tracking import MlflowClient

    params = tune_params(tmp_path)
    summary = tune.run_study(params, tiny_store / "images", progress=False)

    assert summary.trials_run == 3 and summary.states["complete"] == 3
    study = load(params)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 3
    assert summary.best_value == study.best_value and summary.best_trial == study.best_trial.number
    for t in study.trials:  # one report per epoch, value = best validation macro F1
        assert list(t.intermediate_values) == [1] and t.value == t.intermediate_values[1]

    out = tmp_path / "tuned.yaml"
    tune.write_tuned_params(summary, out)
    text = out.read_text()
    tuned = yaml.safe_load(text)
    assert set(tuned) == {"train", "augment"}
    assert tuned["train"]["lr"] == summary.best_lr == study.best_params["lr"]
    assert tuned["augment"]["strength"] == summary.best_strength == study.best_params["strength"]
    assert 1e-5 <= tuned["train"]["lr"] <= 1e-3 and 0.0 <= tuned["augment"]["strength"] <= 1.0
    assert f"trial {summary.best_trial}" in text and STUDY in text
    merged = Params.model_validate(
        {
            **params.model_dump(),
            "train": params.train.model_dump() | tuned["train"],
            "augment": params.augment.model_dump() | tuned["augment"],
        }
    )
    assert merged.train.lr == summary.best_lr  # valid settings for `cnmc train --params-from`

    client = MlflowClient()
    parent = client.get_run(summary.parent_run_id)
    assert parent.info.run_name == f"tune-{STUDY}-test_resnet-ad-hoc"
    assert client.get_experiment(parent.info.experiment_id).name == "cnmc-subject-tuning"
    assert parent.data.tags["cnmc.kind"] == "ad-hoc"
    metrics = parent.data.metrics
    assert metrics["best_lr"] == pytest.approx(summary.best_lr)
    assert metrics["best_strength"] == pytest.approx(summary.best_strength)
    assert metrics["best_val_f1_macro"] == pytest.approx(summary.best_value)
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert artifacts == {"plots/optimization_history.png", "plots/param_importances.png"}
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"tuned.yaml", "trials.csv"}

    children = child_runs(summary.parent_run_id)
    assert len(children) == 3
    by_trial = {int(r.data.params["trial"]): r for r in children}
    assert set(by_trial) == {0, 1, 2}
    for number, run in by_trial.items():
        trial = study.trials[number]
        assert run.data.tags["state"] == "complete" and run.info.status == "FINISHED"
        assert float(run.data.params["lr"]) == pytest.approx(trial.params["lr"])
        assert float(run.data.params["strength"]) == pytest.approx(trial.params["strength"])
        assert run.data.params["backbone"] == "test_resnet"
        assert run.data.metrics["best_val_f1_macro"] == pytest.approx(trial.value)
        assert [m.step for m in client.get_metric_history(run.info.run_id, "val_f1_macro")] == [1]

    # Resume: a second call adds trials; the sampler is seeded past the existing ones.
    again = tune.run_study(params, tiny_store / "images", n_trials=1, progress=False)
    assert again.trials_run == 1 and again.n_trials == 4 and len(load(params).trials) == 4
    assert load(params).trials[3].params != study.trials[0].params
    assert again.parent_run_id != summary.parent_run_id and len(child_runs(again.parent_run_id)) == 1


def test_pruned_trial_is_recorded(tiny_store, mlflow_db, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setattr(tune_study, "build_pruner", lambda params: optuna.pruners.ThresholdPruner(lower=1.1))
    params = tune_params(tmp_path, epochs=2, storage=f"sqlite:///{tmp_path / 'optuna.db'}")  # RDB storage too
    summary = tune.run_study(params, tiny_store / "images", n_trials=1, progress=False)

    (trial,) = load(params).trials
    assert trial.state == TrialState.PRUNED and list(trial.intermediate_values) == [1]  # stopped after epoch 1
    assert summary.states["pruned"] == 1 and summary.best_trial is None
    (run,) = child_runs(summary.parent_run_id)
    assert run.data.tags["state"] == "pruned" and run.info.status == "FINISHED"
    assert len(MlflowClient().get_metric_history(run.info.run_id, "val_f1_macro")) == 1
    with pytest.raises(CnmcError, match="no completed trial"):
        tune.write_tuned_params(summary, tmp_path / "tuned.yaml")
    assert not (tmp_path / "tuned.yaml").exists()


def test_failed_trial_is_recorded_and_the_study_goes_on(tiny_store, mlflow_db, tmp_path, monkeypatch):
    real, calls = train_module.Trainer.train_epoch, []

    def diverge_first(self, epoch):  # noqa: ANN001
        calls.append(epoch)
        if len(calls) == 1:
            raise FloatingPointError("loss became nan in epoch 1")
        return real(self, epoch)

    monkeypatch.setattr(train_module.Trainer, "train_epoch", diverge_first)
    params = tune_params(tmp_path)
    summary = tune.run_study(params, tiny_store / "images", n_trials=2, progress=False)

    assert issubclass(torch.cuda.OutOfMemoryError, tune_trial.TRIAL_ERRORS)  # CUDA OOM also ends only the trial
    failed, ok = load(params).trials
    assert failed.state == TrialState.FAIL and ok.state == TrialState.COMPLETE
    assert failed.user_attrs["failure_reason"] == "FloatingPointError: loss became nan in epoch 1"
    assert summary.states["failed"] == 1 and summary.best_trial == 1
    runs = {int(r.data.params["trial"]): r for r in child_runs(summary.parent_run_id)}
    assert runs[0].info.status == "FAILED" and runs[0].data.tags["state"] == "failed"
    assert runs[0].data.tags["failure_reason"].startswith("FloatingPointError: loss became nan")
    assert runs[1].info.status == "FINISHED" and runs[1].data.tags["state"] == "complete"
    from mlflow.tracking import MlflowClient

    parent = MlflowClient().get_run(summary.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["param_importances"].startswith("skipped")


@pytest.mark.slow
def test_two_concurrent_workers_share_one_journal(tiny_store, mlflow_db, tmp_path):
    from mlflow.tracking import MlflowClient

    params, per_worker = tune_params(tmp_path), 2
    config = tmp_path / "params.yaml"
    config.write_text(yaml.safe_dump(params.model_dump()))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}  # two workers, two cores
    workers = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "cnmc",
                "tune",
                "--params",
                str(config),
                "-q",
                "--n-trials",
                str(per_worker),
                "--store",
                str(tiny_store / "images"),
                "--output",
                str(tmp_path / f"tuned-{i}.yaml"),
            ],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [w.communicate(timeout=240) for w in workers]
    for worker, (_, err) in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, err[-3000:]

    trials = load(params).trials  # none lost, none duplicated
    assert sorted(t.number for t in trials) == list(range(2 * per_worker))
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    assert len({(t.params["lr"], t.params["strength"]) for t in trials}) == 2 * per_worker  # workers seeded apart
    for i in range(2):
        assert set(yaml.safe_load((tmp_path / f"tuned-{i}.yaml").read_text())) == {"train", "augment"}
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("cnmc-subject-tuning").experiment_id])
    parents = [r.info for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 2 and len(runs) == 2 + 2 * per_worker  # a nested run per trial
    assert max(p.start_time for p in parents) < min(p.end_time for p in parents)  # the workers overlapped


def test_live_augmentation_view_replays_the_balancing(tiny_store):
    store = ImageStore(tiny_store / "images" / "train")
    view = tune_trial.live_augmentation_view(store)
    augmented = store.index["augmented"].astype(int).to_numpy() == 1
    origin = store.index["origin"].astype(int).to_numpy()
    assert augmented.any() and (~augmented).any()
    assert len(view) == len(store) and np.array_equal(view.targets, store.targets)  # same balance
    assert np.array_equal(view.transform_mask, augmented)
    assert np.array_equal(np.asarray(view.images), np.asarray(store.images)[origin])
    assert view.images.shape == store.images.shape and view.image_size == store.image_size

    blank = lambda image: torch.zeros_like(image)  # noqa: E731
    images, targets = view.load_batch(np.arange(len(view)), mean=(0, 0, 0), std=(1, 1, 1), transform=blank)
    assert np.array_equal(targets.numpy(), store.targets)
    flat = images.flatten(1)
    assert (flat[torch.from_numpy(augmented)] == 0).all()  # the copies went through the transform
    originals = torch.from_numpy(np.asarray(store.images)[~augmented]).permute(0, 3, 1, 2).float() / 255
    assert torch.allclose(images[torch.from_numpy(~augmented)], originals)  # the originals did not

    with pytest.raises(IndexError):
        store.subset([len(store)])
    with pytest.raises(CnmcError, match="min_lr|lr_min"):
        tune.run_study(tune_params(Path("/nonexistent"), lr_min=1e-2, lr_max=1e-3), tiny_store / "images")


def test_a_torn_journal_line_is_one_line_naming_it_and_the_repair(tmp_path: Path) -> None:
    from cnmc.core.config import apply_overrides

    journal = tmp_path / "optuna-journal.log"
    params = apply_overrides(Params(), [f"tune.storage=journal:{journal}"])
    study = tune_study.open_study(params)
    study.enqueue_trial({"lr": 1e-4})
    lines = journal.read_text().splitlines()
    # A worker killed mid-write leaves half a line; the next worker's record is appended to it.
    journal.write_text("\n".join([*lines[:-1], lines[-1][:15] + lines[-1], ""]))
    with pytest.raises(CnmcError, match=rf"line {len(lines)} of the Optuna journal is not whole JSON.*sed -i") as info:
        tune_study.open_study(params)
    assert str(journal) in str(info.value) and "\n" not in str(info.value)
