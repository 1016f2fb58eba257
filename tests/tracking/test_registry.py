"""Promotion to the registered ``champion``: which run is picked, when the alias moves, the
version's tags and model card, ``promotion.json``; on a temporary SQLite MLflow store.

Most runs here are made with the client alone (tags, metrics, a metrics document and an empty
logged model): promotion reads nothing else. One test promotes a real ``train_and_evaluate`` run and
serves it through ``models:/cnmc-classifier@champion``.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import stat
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import pytest
from helpers.documents import metrics_document as complete_metrics_document
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from PIL import Image

from cnmc.core.config import Params, PromoteConfig
from cnmc.core.errors import CnmcError
from cnmc.jobs.model_card import load_metrics_document
from cnmc.jobs.promote import promote, write_promotion

# Most tests rank on test metrics: fewer to fake.
CFG = PromoteConfig(rank_on="test", metric="f1_all", tie_breaker="roc_auc")
NAME = CFG.model_name
DATA = "d" * 32
OTHER_DATA = "e" * 32
_clock = itertools.count(1_700_000_000_000, 60_000)  # distinct, increasing run start times


def fake_run(
    client: MlflowClient,
    f1: float,
    roc_auc: float = 0.8,
    data_hash: str = DATA,
    protocol: str = "subject",
    experiment: str | None = None,
    model: bool = True,
    status: str = "FINISHED",
    document: dict[str, Any] | None = None,
    val_f1_macro: float | None = None,
) -> str:
    """A run as ``train_and_evaluate`` leaves it, as far as promotion looks; returns its id."""
    name = experiment or f"cnmc-{protocol}"
    found = client.get_experiment_by_name(name)
    experiment_id = found.experiment_id if found else client.create_experiment(name)
    tags = {"backbone": "fake", "protocol": protocol, "data_hash": data_hash, "git_commit": "c0ffee"}
    run_id = client.create_run(experiment_id, start_time=next(_clock), tags=tags).info.run_id
    metrics = {
        "test_f1_all": f1,
        "test_roc_auc": roc_auc,
        "test_f1_macro": f1 - 0.05,
        "test_accuracy": f1 - 0.02,
        "test_t0.5_f1_all": f1 - 0.1,
        "threshold": 0.4,
    }
    if val_f1_macro is not None:  # the selected model on validation, as train_and_evaluate logs it
        metrics |= {"final_val_f1_macro": val_f1_macro, "final_val_roc_auc": val_f1_macro + 0.05}
    client.log_batch(run_id, [Metric(k, v, 0, 0) for k, v in metrics.items()])
    client.log_dict(run_id, document or metrics_document(f1), "fake.json")
    if model:
        logged = client.create_logged_model(experiment_id, name="model", source_run_id=run_id)
        client.finalize_logged_model(logged.model_id, "READY")
    client.set_terminated(run_id, status)
    return run_id


def metrics_document(f1: float = 0.9) -> dict[str, Any]:
    """A metrics document like the evaluate stage's, with bootstrap intervals."""
    tuned = {
        "f1_all": f1,
        "roc_auc": 0.8,
        "f1_macro": f1 - 0.05,
        "accuracy": f1 - 0.02,
        "n": 40,
        "n_all": 25,
        "n_hem": 15,
        "n_subjects": 4,
        "mean_subject_accuracy": 0.77,
    }
    half = {**tuned, "f1_all": f1 - 0.1}
    ci = {"f1_all": [0.812, 0.951], "roc_auc": [0.701, 0.877], "f1_macro": [0.7, 0.9], "accuracy": [0.6, 0.9]}
    test = {"at_tuned": tuned, "at_0.5": half, "threshold": 0.4, "ci95": {"at_tuned": ci, "at_0.5": ci}}
    return complete_metrics_document(test, data_hash=DATA, epoch_selection="best")


@pytest.fixture
def client(mlflow_db: str) -> MlflowClient:
    return MlflowClient(tracking_uri=mlflow_db)


def champion(client: MlflowClient) -> str:
    return str(client.get_model_version_by_alias(NAME, "champion").version)


def versions(client: MlflowClient) -> list[str]:
    return sorted(str(v.version) for v in client.search_model_versions(f"name = '{NAME}'"))


# -- the alias --------------------------------------------------------------------------------------
def test_better_run_moves_the_alias_and_a_worse_one_leaves_it(client: MlflowClient) -> None:
    first = fake_run(client, f1=0.70)
    result = promote(CFG, "subject", DATA, client)
    assert (result.version, result.run_id, result.promoted) == ("1", first, True)
    assert "no 'champion' yet" in result.reason
    assert champion(client) == "1"

    better = fake_run(client, f1=0.80)
    result = promote(CFG, "subject", DATA, client)
    assert (result.version, result.run_id, result.promoted) == ("2", better, True)
    assert result.value == 0.80 and result.champion_version == "2"
    assert "beats champion v1" in result.reason and "0.8000 > 0.7000" in result.reason
    assert champion(client) == "2"

    # The champion's run is deleted (it stays registered); a worse new run is the best left.
    client.delete_run(better)
    worse = fake_run(client, f1=0.75)
    result = promote(CFG, "subject", DATA, client)
    assert (result.version, result.run_id, result.promoted) == ("3", worse, False)
    assert result.champion_version == "2" and champion(client) == "2"
    assert result.reason.startswith("champion v2 (test f1_all 0.8000) is at least as good as run")
    assert "(0.7500)" in result.reason


def test_by_default_validation_chooses_and_test_only_reports(client: MlflowClient) -> None:
    best_on_test = fake_run(client, f1=0.95, val_f1_macro=0.70)
    best_on_val = fake_run(client, f1=0.80, val_f1_macro=0.85)
    result = promote(PromoteConfig(), "subject", DATA, client)
    assert (result.run_id, result.rank_on, result.metric, result.value) == (best_on_val, "val", "roc_auc", 0.9)
    assert best_on_test != result.run_id and "val roc_auc 0.9000" in result.reason
    assert "Selected by: validation roc_auc = 0.900" in result.model_card
    assert "the test metrics below played no part in the choice" in result.model_card
    tags = client.get_model_version(NAME, result.version).tags
    assert float(tags["final_val_f1_macro"]) == 0.85 and float(tags["test_f1_all"]) == 0.80


def test_without_a_release_only_the_challenger_moves(client: MlflowClient) -> None:
    """What `dvc exp run` does: the best run becomes the challenger; the champion stays."""
    first = fake_run(client, f1=0.70)
    assert promote(CFG, "subject", DATA, client).promoted and champion(client) == "1"
    better = fake_run(client, f1=0.90)
    result = promote(CFG, "subject", DATA, client, release=False)
    assert (result.run_id, result.version, result.promoted, result.released) == (better, "2", False, False)
    assert champion(client) == "1" and result.champion_version == "1"
    assert str(client.get_model_version_by_alias(NAME, "challenger").version) == "2"
    assert "not a release, 'champion' untouched" in result.reason
    assert "not a release" in result.model_card and first != better


def test_ties_go_to_the_tie_breaker_then_the_newest_run(client: MlflowClient) -> None:
    fake_run(client, f1=0.8, roc_auc=0.7)
    high_auc = fake_run(client, f1=0.8, roc_auc=0.9)
    fake_run(client, f1=0.8, roc_auc=0.6)
    assert promote(CFG, "subject", DATA, client).run_id == high_auc
    newest = fake_run(client, f1=0.8, roc_auc=0.9)
    result = promote(CFG, "subject", DATA, client)
    assert result.run_id == newest and not result.promoted  # equal to the champion: alias stays
    assert champion(client) == "1" and "at least as good" in result.reason


def test_repromoting_the_same_run_reuses_its_version(client: MlflowClient) -> None:
    run_id = fake_run(client, f1=0.8, document=metrics_document(0.8))
    first = promote(CFG, "subject", DATA, client)
    again = promote(CFG, "subject", DATA, client)
    assert versions(client) == ["1"]
    assert (again.version, again.run_id, again.promoted) == ("1", run_id, True)
    assert "already 'champion'; nothing changed" in again.reason
    assert again.model_card == first.model_card


def test_a_model_name_with_a_quote_is_promoted_and_found_again(client: MlflowClient) -> None:
    quoted = PromoteConfig.model_validate(CFG.model_dump() | {"model_name": "lab's cnmc"})
    fake_run(client, f1=0.8)
    first = promote(quoted, "subject", DATA, client)
    again = promote(quoted, "subject", DATA, client)  # finds its version through a filter on the name
    assert (first.version, again.version, first.name) == ("1", "1", "lab's cnmc")


def test_other_data_and_unfinished_or_modelless_runs_do_not_compete(client: MlflowClient) -> None:
    same = fake_run(client, f1=0.70)
    fake_run(client, f1=0.99, data_hash=OTHER_DATA)  # better, but on other data
    fake_run(client, f1=0.95, protocol="paper", experiment="cnmc-subject")  # other protocol
    fake_run(client, f1=0.98, model=False)  # no logged model
    fake_run(client, f1=0.97, status="FAILED")
    result = promote(CFG, "subject", DATA, client)
    assert result.run_id == same and champion(client) == "1"
    # The other data's best doesn't take the alias from a same-data champion ...
    assert promote(CFG, "subject", DATA, client).champion_version == "1"

    # ... but promoting for the new data: the old champion is not comparable, the best run takes it.
    result = promote(CFG, "subject", OTHER_DATA, client)
    assert result.promoted and result.version == "2" and champion(client) == "2"
    assert result.data_hash == OTHER_DATA and result.value == 0.99
    assert "not comparable" in result.reason and DATA[:8] in result.reason
    # And then the first data's run does not beat it back by comparison: it is again not comparable.
    assert promote(CFG, "subject", DATA, client).champion_version == "1"


def test_no_candidate_is_a_one_line_error(client: MlflowClient) -> None:
    with pytest.raises(CnmcError, match=r"no experiment 'cnmc-paper'.*cnmc train"):
        promote(CFG, "paper", DATA, client)
    fake_run(client, f1=0.9, data_hash=OTHER_DATA)
    fake_run(client, f1=0.9, model=False)
    with pytest.raises(CnmcError) as info:
        promote(CFG, "subject", DATA, client)
    message = str(info.value)
    assert "\n" not in message
    for part in ("'cnmc-subject'", "'test_f1_all'", "protocol 'subject'", DATA[:12], "cnmc train"):
        assert part in message


def test_a_version_not_made_by_promote_is_never_loaded_and_loses_the_alias(
    client: MlflowClient, tmp_path: Path
) -> None:
    """The hijack: anyone who can write the tracking store registers a folder and moves champion to
    it. Loading it is refused before any of its files is read; the next promotion takes the alias back."""
    from cnmc.serving.trusted import load_served_model
    from cnmc.tracking.version_check import registry_version, version_problem

    run_id = fake_run(client, f1=0.8)
    promote(CFG, "subject", DATA, client)
    crafted = tmp_path / "crafted"
    crafted.mkdir()
    client.create_model_version(NAME, source=str(crafted))  # v2: no run
    client.set_registered_model_alias(NAME, "champion", "2")
    with pytest.raises(CnmcError) as info:
        load_served_model(f"models:/{NAME}@champion")
    message = str(info.value)
    assert "\n" not in message and "not registered by `cnmc promote`" in message and "names no run" in message
    assert "--trust-model" in message

    # Each part of the check: the run's source, its status, its tags.
    client.create_model_version(NAME, source=str(crafted), run_id=run_id)  # v3: a real run, other files
    unfinished = fake_run(client, f1=0.7, status="RUNNING")
    client.set_terminated(unfinished, "RUNNING")
    untagged = fake_run(client, f1=0.7)
    client.delete_tag(untagged, "git_commit")
    problems = {
        "3": f"is not run {run_id[:8]}'s logged model",
        "4": "is RUNNING, not FINISHED",
        "5": "lacks the tags a cnmc training run carries (git_commit)",
    }
    for number, run in (("4", unfinished), ("5", untagged)):
        experiment_id = client.get_run(run).info.experiment_id
        logged = client.search_logged_models([experiment_id], filter_string=f"source_run_id = '{run}'")[0]
        made = client.create_model_version(
            NAME, source=f"models:/{logged.model_id}", run_id=run, model_id=logged.model_id
        )
        assert str(made.version) == number
    for number, problem in problems.items():
        version = registry_version(client, f"models:/{NAME}/{number}")
        assert version is not None and problem in version_problem(client, version)
    assert version_problem(client, client.get_model_version(NAME, "1")) == ""

    result = promote(CFG, "subject", DATA, client)
    assert result.promoted and champion(client) == "1"
    assert "champion v2 was not registered by `cnmc promote`" in result.reason


# -- tags, card, promotion.json ------------------------------------------------------------------------
def test_version_tags_card_and_promotion_json(client: MlflowClient, tmp_path: Path) -> None:
    run_id = fake_run(client, f1=0.9, document=metrics_document(0.9))
    result = promote(CFG, "subject", DATA, client)
    version = client.get_model_version(NAME, result.version)
    tags = version.tags
    assert float(tags["test_f1_all"]) == 0.9 and float(tags["test_roc_auc"]) == 0.8
    assert float(tags["test_f1_macro"]) == pytest.approx(0.85) and "test_accuracy" in tags
    assert "test_t0.5_f1_all" not in tags and float(tags["threshold"]) == 0.4
    assert tags["protocol"] == "subject" and tags["data_hash"] == DATA
    assert tags["run_id"] == run_id and tags["backbone"] == "fake" and tags["git_commit"] == "c0ffee"

    card = result.model_card
    assert version.description == card
    assert client.download_artifacts(run_id, "model_card.md", str(tmp_path / "dl"))
    assert (tmp_path / "dl" / "model_card.md").read_text() == card
    for section in (
        "# Model card: cnmc-classifier v1",
        "## Model",
        "## Data and protocol",
        "## Test metrics",
        "## Decision threshold",
        "## Intended use",
        "## Known limitations",
        "## How to use",
    ):
        assert section in card, section
    assert "Not for clinical diagnosis" in card
    assert f"`{run_id}`" in card and "`c0ffee`" in card and DATA in card and "subject-disjoint" in card
    assert "| F1 (ALL) | 0.900 [0.812, 0.951] | 0.800 [0.812, 0.951] |" in card
    assert "| ROC AUC | 0.800 [0.701, 0.877]" in card
    assert "prob_all >= 0.4000" in card
    assert "ignore subject clustering" in card and "Subject leakage under the paper protocol" in card
    assert "scanner" in card and "domain shift" in card
    assert "Small test set (40 cells)" in card and "Demo data" not in card  # not the demo's hash

    old_mask = os.umask(0o022)
    try:
        path = write_promotion(result, tmp_path / "registry")
    finally:
        os.umask(old_mask)
    assert path == tmp_path / "registry" / "promotion.json"
    for written in (path, path.with_name("model_card.md")):  # a teammate can read them
        assert stat.S_IMODE(written.stat().st_mode) == 0o644
    assert json.loads(path.read_text()) == {
        "name": NAME,
        "version": "1",
        "run_id": run_id,
        "metric": "f1_all",
        "value": 0.9,
        "data_hash": DATA,
        "protocol": "subject",
        "backbone": "fake",
        "candidate_alias": "challenger",
        "released": True,
        "promoted": True,
        "reason": result.reason,
        "alias": "champion",
        "champion_version": "1",
        "rank_on": "test",
        "tracking_store": result.tracking_store,  # which registry the card and the JSON describe
    }
    assert result.tracking_store.startswith("sqlite:///") and f"in `{result.tracking_store}`" in card
    assert (tmp_path / "registry" / "model_card.md").read_text() == card


def test_a_run_without_a_metrics_document_gets_no_card(client: MlflowClient) -> None:
    bare = client.create_run(client.create_experiment("bare"), tags={"backbone": "fake"}).info.run_id
    with pytest.raises(CnmcError, match=f"run {bare} has no metrics document 'fake.json': evaluate it first"):
        load_metrics_document(client, client.get_run(bare))


# -- a real training run, served from the registry ---------------------------------------------------
def test_real_run_is_promoted_and_served_from_the_alias(copy_store: Path, mlflow_db: str, tmp_path: Path) -> None:
    from cnmc.jobs.fit_evaluate import train_and_evaluate
    from cnmc.jobs.paths import RunPaths
    from cnmc.serving.pyfunc import encode_file

    base = Params()
    params = base.model_copy(
        update={
            "train": base.train.model_copy(
                update={"epochs": 1, "batch_size": 16, "device": "cpu", "pretrained": False}
            ),
            "augment": base.augment.model_copy(update={"image_size": 32, "per_class": 16, "workers": 1}),
        }
    )
    paths = RunPaths(copy_store, "test_resnet")
    doc = train_and_evaluate(params, "test_resnet", paths, progress=False)
    client = MlflowClient(tracking_uri=mlflow_db)
    result = promote(CFG, "subject", doc.data_hash, client)
    assert (result.run_id, result.version, result.promoted) == (doc.run_id, "1", True)
    assert result.backbone == "test_resnet" and result.value == pytest.approx(doc.test.at_tuned["f1_all"])

    low, high = doc.test.ci95["at_tuned"]["f1_all"]
    assert f"[{low:.3f}, {high:.3f}]" in result.model_card
    assert doc.people is not None and "## Per person" in result.model_card and doc.people.line() in result.model_card

    expected = pd.read_csv(paths.evaluation_dir / "predictions.csv").head(4)
    shutil.rmtree(paths.model_dir)  # the registry, not the local files, serves it
    model = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    out = model.predict(pd.DataFrame({"image": [encode_file(Path(p)) for p in expected["path"]]}))
    np.testing.assert_allclose(out["prob_all"], expected["prob_all"], atol=1e-5)
    assert list(out["label"]) == list(expected["predicted"])


def test_a_card_longer_than_the_registry_column_is_cut_at_a_line_and_says_where_the_whole_is() -> None:
    from cnmc.jobs.promote import MAX_DESCRIPTION, version_description

    short = "# Model card\n\nshort"
    assert version_description(short, "r1") == short
    long = "\n".join(f"| row {k} | {'x' * 60} |" for k in range(200))
    cut = version_description(long, "r1")
    assert len(cut) <= MAX_DESCRIPTION and cut.endswith("the whole card is `model_card.md` of run `r1`)")
    assert long.startswith(cut.split("\n\n... (cut")[0])  # whole lines kept, nothing altered


def test_a_tracking_server_that_is_down_is_one_line_without_its_password(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, tmp_path: Path
) -> None:
    import socket

    from cnmc.cli import main

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://alice:s3cret@127.0.0.1:{port}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    params = Path(__file__).resolve().parents[2] / "params.yaml"
    cell = tmp_path / "cell.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(cell)
    for argv in (["promote", "--params", str(params)], ["predict", "--params", str(params), str(cell), "-o", "o.csv"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "s3cret" not in err and "alice:***@" in err and len(err.strip().splitlines()) == 1, err


def test_promotions_at_once_register_the_run_once_and_agree_on_the_aliases(
    client: MlflowClient, mlflow_db: str
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    fake_run(client, f1=0.8)
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(
            pool.map(lambda _: promote(CFG, "subject", DATA, MlflowClient(tracking_uri=mlflow_db)), range(4))
        )
    assert versions(client) == ["1"] and {r.version for r in results} == {"1"}
    assert champion(client) == str(client.get_model_version_by_alias(NAME, "challenger").version) == "1"


def test_a_metric_added_in_one_place_reaches_mlflow_the_report_the_card_and_its_interval(
    client: MlflowClient, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """One registry entry (the negative predictive value) and nothing else: every view shows it."""
    from cnmc.core import metric_catalogue as catalogue
    from cnmc.jobs.report import build_report
    from cnmc.metrics.document import MetricsDocument
    from cnmc.metrics.scores import evaluate_split

    npv = catalogue.Metric(
        "npv",
        "NPV (Hem)",
        from_counts=lambda c: catalogue.safe_divide(c.tn, c.tn + c.fn),
        shown_in=frozenset({catalogue.REPORT, catalogue.CARD, catalogue.HEADLINE, catalogue.INTERVAL}),
    )
    monkeypatch.setattr(catalogue, "REGISTRY", (*catalogue.REGISTRY, npv))
    rng = np.random.default_rng(0)
    y = (rng.random(200) < 0.6).astype(int)
    p = np.clip(0.5 * y + 0.5 * rng.random(200), 0, 1)
    test = evaluate_split(y, p, [f"s{i % 8}" for i in range(200)], val_threshold=0.5, n_boot=100)
    low, high = test["ci95"]["at_tuned"]["npv"]
    assert low <= test["at_tuned"]["npv"] <= high  # its bootstrap interval came with it
    payload = complete_metrics_document(test, data_hash=DATA, epoch_selection="best")
    document = MetricsDocument.model_validate(payload)
    assert "test_npv" in document.mlflow_metrics() and "npv" in document.headline()["test"]
    (tmp_path / "m.json").write_text(json.dumps(payload))
    assert "NPV (Hem)" in build_report([tmp_path / "m.json"], tmp_path / "report").markdown
    fake_run(client, f1=0.8, document=payload)
    card = promote(CFG, "subject", DATA, client).model_card
    assert "| NPV (Hem) |" in card and "npv" in card.split("Bootstrap 95% intervals")[1].splitlines()[0]
