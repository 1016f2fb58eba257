"""Cross-fitting over people (``split.validation: crossfit``): K fold models, each judging the people
it never saw; every choice made on their pooled out-of-fold answers; the folds' mean served, in
process and over HTTP; an interrupted cross-fit resumed in the fold it stopped in. The tiny store
here is cut to the cell (``augment.crop: cell``), so the served answers also show the crop travel
with the model."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from helpers.params import SEED, TINY_AUGMENT, tiny_params
from helpers.runs import TrainingCopy
from helpers.servers import cells, post

from cnmc.core.config import AugmentConfig, Params, SplitConfig
from cnmc.core.errors import CnmcError
from cnmc.data.split import FOLD_COLUMN
from cnmc.jobs.paths import RunPaths, open_stores
from cnmc.training.crossfit import choose_epoch

BACKBONE = "test_resnet"
FOLDS = 3
# Many small people: 6 a class in training (K = 3 folds of 2 a class), one a class to test on.
MANY_PEOPLE = {
    "train_subjects_per_class": 6,
    "prelim_subjects_per_class": 1,
    "all_cells_per_subject": 3,
    "hem_cells_per_subject": 2,
    "final_images": 0,
    "image_size": 64,
}


def crossfit_params(**train: object) -> Params:
    params = tiny_params(epochs=2, **train)
    return params.model_copy(
        update={
            "split": params.split.model_copy(update={"validation": "crossfit", "folds": FOLDS}),
            "augment": params.augment.model_copy(update={"crop": "cell"}),
        }
    )


@pytest.fixture(scope="module")
def crossfit_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A prepared pipeline folder (``outputs/``-like) of many small synthetic people, cross-fitted
    into 3 folds, every image cut to its cell. Read-only: tests copy it."""
    from helpers.synthetic_cells import SyntheticConfig, write_synthetic_dataset

    from cnmc.data.augment import prepare_dataset
    from cnmc.data.manifest import build_manifest
    from cnmc.data.split import split_manifest, write_splits

    data = tmp_path_factory.mktemp("many-people") / "data"
    write_synthetic_dataset(data, SyntheticConfig(**MANY_PEOPLE), seed=SEED)
    root = data.parent / "outputs"
    manifest = build_manifest(data, workers=1)
    splits = split_manifest(manifest.table, SplitConfig(validation="crossfit", folds=FOLDS), seed=SEED)
    write_splits(splits, root / "splits", root / "split_report.json")
    augment = AugmentConfig(**TINY_AUGMENT | {"crop": "cell"})
    prepare_dataset(root / "splits", root / "images", augment, SEED, root / "plots" / "preview.png", progress=False)
    return root


@dataclass(frozen=True)
class CrossFitted:
    root: Path
    tracking_uri: str
    document: object  # cnmc.metrics.document.MetricsDocument
    oof_seen_by_threshold: np.ndarray  # the probabilities the threshold rule was given


@pytest.fixture(scope="module")
def cross_fitted(
    crossfit_store: Path, mlflow_db_template: Path, tmp_path_factory: pytest.TempPathFactory
) -> CrossFitted:
    """One cross-fitted tiny backbone, trained and evaluated (with a spy on the threshold rule)."""
    import cnmc.metrics.validation_rules

    copy = TrainingCopy(crossfit_store, mlflow_db_template, tmp_path_factory.mktemp("crossfit-run"))
    seen: list[np.ndarray] = []
    rule = cnmc.metrics.validation_rules.choose_threshold

    def spy(targets, probs, subjects):  # noqa: ANN001, ANN202 - the rule's own signature
        seen.append(np.asarray(probs))
        return rule(targets, probs, subjects)

    def spy_on_the_rule(mp: pytest.MonkeyPatch) -> None:
        mp.setattr(cnmc.metrics.validation_rules, "choose_threshold", spy)

    document = copy.train(crossfit_params(), BACKBONE, patch=spy_on_the_rule)
    return CrossFitted(copy.root, copy.tracking_uri, document, seen[0] if seen else np.array([]))


def members(root: Path) -> list:
    from cnmc.serving.pyfunc import load_member

    paths = RunPaths(root, BACKBONE)
    return [
        load_member(paths.fold_weights(k), paths.evaluation_dir / "model.json", paths.familiarity_file(k))
        for k in range(FOLDS)
    ]


@pytest.mark.slow
def test_every_training_person_is_judged_once_by_the_fold_model_that_never_saw_them(cross_fitted) -> None:
    from cnmc.inference.probability import predict_proba

    document, paths = cross_fitted.document, RunPaths(cross_fitted.root, BACKBONE)
    assert document.folds == FOLDS and not (paths.model_dir / "weights.pt").exists()
    val = open_stores(paths.store)["val"]
    assert document.validation.n_all + document.validation.n_hem == len(val)  # every training cell judges
    folds = val.index[FOLD_COLUMN].astype(int).to_numpy()
    out_of_fold = np.empty(len(val))
    for fold, member in enumerate(members(cross_fitted.root)):
        rows = np.flatnonzero(folds == fold)
        out_of_fold[rows] = predict_proba(member.model, np.array(val.images[rows]), member.spec, tta=member.spec.tta)
    # The threshold was chosen on exactly these answers: none from a model that trained on the person.
    np.testing.assert_allclose(cross_fitted.oof_seen_by_threshold, out_of_fold, atol=1e-5)
    assert "pooled out-of-fold" in document.epoch_selection
    assert f"in {FOLDS} folds (fold 0: 2 ALL, 2 Hem;" in document.validation_scheme  # the card and report say it


@pytest.mark.slow
def test_each_fold_is_a_child_run_of_the_backbones_run(cross_fitted) -> None:
    client = mlflow.tracking.MlflowClient(tracking_uri=cross_fitted.tracking_uri)
    parent = client.get_run(cross_fitted.document.run_id)
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(c.data.tags["cnmc.fold"] for c in children) == [str(k) for k in range(FOLDS)]
    assert all(len(client.get_metric_history(c.info.run_id, "val_f1_macro")) == 2 for c in children)
    assert parent.data.params["folds"] == str(FOLDS)


@pytest.mark.slow
def test_the_served_cross_fitted_model_answers_with_the_mean_of_its_folds_in_process_and_over_http(
    cross_fitted, tmp_path: Path
) -> None:
    """P(ALL) and the familiarity score are the folds' means; the flag follows the score; the same
    answer comes back over HTTP."""
    from helpers import local_server

    from cnmc.inference.probability import predict_cells
    from cnmc.serving.pyfunc import decode_base64_images

    uri = f"runs:/{cross_fitted.document.run_id}/model"
    frame = cells()
    mlflow.set_tracking_uri(cross_fitted.tracking_uri)
    try:
        model = mlflow.pyfunc.load_model(uri)
        local = model.predict(frame)
    finally:
        mlflow.set_tracking_uri(None)
    folds = members(cross_fitted.root)
    spec = folds[0].spec
    assert spec.crop == "cell" and all(m.familiarity is not None for m in folds)
    images = decode_base64_images(list(frame["image"]), spec.framing)
    outputs = [predict_cells(m.model, images, m.spec) for m in folds]
    mean = np.mean([o.prob for o in outputs], axis=0)
    np.testing.assert_allclose(local["prob_all"].to_numpy(), mean, atol=1e-6)
    score = np.mean([m.familiarity.score(o.features) for m, o in zip(folds, outputs, strict=True)], axis=0)
    np.testing.assert_allclose(local["ood_score"].to_numpy(), score, rtol=1e-5)
    assert (local["ood"] == (local["ood_score"] > 1)).all()
    assert (local["threshold"] == cross_fitted.document.threshold).all()
    port = local_server.free_port()
    log = tmp_path / "server.log"
    env = local_server.serving_env(cross_fitted.tracking_uri)
    proc = local_server.start(local_server.cnmc_serve(uri, port), tmp_path, env, log)
    try:
        url = f"http://127.0.0.1:{port}"
        local_server.wait_until_up(f"{url}/ping", proc, log)
        served = post(url, frame)
    finally:
        local_server.stop(proc)
    np.testing.assert_allclose([r["prob_all"] for r in served], local["prob_all"].to_numpy(), atol=1e-6)
    np.testing.assert_allclose([r["ood_score"] for r in served], local["ood_score"].to_numpy(), rtol=1e-5)
    assert [r["ood"] for r in served] == local["ood"].tolist()


@pytest.mark.slow
def test_an_interrupted_cross_fit_resumes_in_the_fold_it_stopped_in(
    crossfit_store: Path, mlflow_db: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cnmc.jobs.train import train_backbone
    from cnmc.training.trainer import Trainer

    root = Path(shutil.copytree(crossfit_store, tmp_path / "outputs"))
    paths = RunPaths(root, BACKBONE)
    epochs_run: list[int] = []
    train_epoch = Trainer.train_epoch

    def counted(self: Trainer, epoch: int) -> float:
        if len(epochs_run) == 3:  # fold 0's two epochs and fold 1's first are done: stop in fold 1
            raise KeyboardInterrupt("signal 15")
        epochs_run.append(epoch)
        return train_epoch(self, epoch)

    monkeypatch.setattr(Trainer, "train_epoch", counted)
    with pytest.raises(CnmcError, match="--resume"):
        train_backbone(crossfit_params(), BACKBONE, paths, progress=False)
    first_fold = (paths.fold_work(0) / "fold.json").read_text()
    assert not (paths.fold_work(1) / "fold.json").exists() and (paths.fold_work(1) / "checkpoint.pt").is_file()
    epochs_run.clear()
    monkeypatch.setattr(
        Trainer, "train_epoch", lambda self, epoch: epochs_run.append(epoch) or train_epoch(self, epoch)
    )
    summary = train_backbone(crossfit_params(), BACKBONE, paths, resume=True, progress=False)
    # Fold 1 goes on from its second epoch, fold 2 runs whole, fold 0 is not trained again.
    assert epochs_run == [1, 0, 1]
    assert (paths.fold_work(0) / "fold.json").read_text() == first_fold
    assert summary is not None and summary.folds == FOLDS
    assert all(paths.fold_weights(k).is_file() for k in range(FOLDS))
    history = pd.read_csv(paths.history)
    assert list(history["epoch"]) == [1, 2]
    assert json.loads(paths.fit_file.read_text())["best_epoch"] in (1, 2)


@pytest.mark.slow
def test_cnmc_ensemble_says_a_cross_fitted_backbone_is_already_an_ensemble(cross_fitted) -> None:
    from cnmc.jobs.ensemble import build_ensemble

    with pytest.raises(CnmcError, match="test_resnet is cross-fitted"):
        build_ensemble(crossfit_params(), [BACKBONE, "test_efficientnet"], cross_fitted.root)


def test_the_epoch_is_the_one_whose_pooled_answers_rank_best_not_the_one_nearest_0_5() -> None:
    """Epoch 1 sits on the right side of 0.5 more often (better macro F1 at 0.5); epoch 2 ranks every
    ALL cell above every Hem cell but calls all of them ALL: epoch 2 is kept."""
    targets = np.array([1, 1, 0, 0, 1, 1, 0, 0])
    fold_of_row = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    epoch_1 = np.array([0.6, 0.4, 0.45, 0.55])
    epoch_2 = np.array([0.95, 0.9, 0.7, 0.6])
    choice = choose_epoch(targets, fold_of_row, [[epoch_1, epoch_2], [epoch_1, epoch_2]])
    assert choice.pooled[0]["val_f1_macro"] > choice.pooled[1]["val_f1_macro"]
    assert choice.pooled[1]["val_roc_auc"] == 1.0
    assert choice.epoch == 2 and "ROC AUC" in choice.selection
