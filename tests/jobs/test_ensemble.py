"""``cnmc ensemble``: the mean of evaluated backbones as one logged model, in process and over HTTP;
and a model's own input transform (colour centring) answering the same in process and over HTTP."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
from helpers.params import tiny_params
from helpers.runs import TinyRuns
from helpers.servers import Server, cells, post

from cnmc.core.errors import CnmcError

BACKBONES = ("test_resnet", "test_efficientnet")


@pytest.fixture(scope="module")
def ensemble(tiny_runs: TinyRuns, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict]:
    """The tiny ensemble of both backbones, logged to a copy of the tiny runs' store (the UI test
    counts that store's runs): its model URI and its summary file."""
    import shutil

    from cnmc.jobs.ensemble import build_ensemble

    member_uris = {b: tiny_runs(b).model_uri for b in BACKBONES}
    copy = tmp_path_factory.mktemp("ensemble") / "mlflow.db"
    shutil.copyfile(tiny_runs.db, copy)
    uri = f"sqlite:///{copy}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.chdir(tiny_runs.work)
        try:
            summary = build_ensemble(tiny_params(), BACKBONES, tiny_runs.root)
        finally:
            mlflow.set_tracking_uri(None)
    facts = json.loads((tiny_runs.root / "ensemble" / "ensemble.json").read_text())
    return f"runs:/{summary.run_id}/model", facts | {"member_uris": member_uris, "tracking_uri": uri}


@pytest.mark.slow
def test_an_ensemble_answers_with_the_mean_of_its_members(tiny_runs: TinyRuns, ensemble: tuple[str, dict]) -> None:
    uri, facts = ensemble
    assert facts["members"] == list(BACKBONES)
    assert facts["rule"].startswith(("0.5", f"{facts['threshold']:.3f}"))  # the rule says which and why
    mlflow.set_tracking_uri(facts["tracking_uri"])
    try:
        frame = cells()
        together = mlflow.pyfunc.load_model(uri).predict(frame)
        members = [mlflow.pyfunc.load_model(u).predict(frame) for u in facts["member_uris"].values()]
    finally:
        mlflow.set_tracking_uri(None)
    mean = np.mean([m["prob_all"].to_numpy() for m in members], axis=0)
    np.testing.assert_allclose(together["prob_all"].to_numpy(), mean, atol=1e-6)
    assert (together["threshold"] == facts["threshold"]).all()
    assert list(together["label"]) == ["all" if p >= facts["threshold"] else "hem" for p in together["prob_all"]]


@pytest.mark.slow
def test_a_served_ensemble_answers_as_in_process(
    tiny_runs: TinyRuns, ensemble: tuple[str, dict], tmp_path: Path
) -> None:
    from helpers import local_server

    uri, facts = ensemble
    port = local_server.free_port()
    log = tmp_path / "server.log"
    proc = local_server.start(
        local_server.cnmc_serve(uri, port), tmp_path, local_server.serving_env(facts["tracking_uri"]), log
    )
    try:
        url = f"http://127.0.0.1:{port}"
        local_server.wait_until_up(f"{url}/ping", proc, log)
        frame = cells()
        served = post(url, frame)
        mlflow.set_tracking_uri(facts["tracking_uri"])
        try:
            local = mlflow.pyfunc.load_model(uri).predict(frame)
        finally:
            mlflow.set_tracking_uri(None)
        np.testing.assert_allclose([r["prob_all"] for r in served], local["prob_all"].to_numpy(), atol=1e-6)
    finally:
        local_server.stop(proc)


@pytest.mark.slow
def test_a_colour_centred_model_answers_the_same_in_process_and_over_http(
    cnmc_server: Server, champion, tmp_path: Path
) -> None:  # noqa: ANN001 - helpers.runs.Champion
    mlflow.set_tracking_uri(champion.tracking_uri)
    try:
        model = mlflow.pyfunc.load_model(champion.model_uri)
    finally:
        mlflow.set_tracking_uri(None)
    assert model.unwrap_python_model().spec.colour == "centred"
    frame = cells(3)
    served = post(cnmc_server.url, frame)
    np.testing.assert_allclose([r["prob_all"] for r in served], model.predict(frame)["prob_all"].to_numpy(), atol=1e-6)


def test_an_ensemble_needs_two_evaluated_backbones(tmp_path: Path) -> None:
    from cnmc.jobs.ensemble import build_ensemble

    with pytest.raises(CnmcError, match="at least two"):
        build_ensemble(tiny_params(), ["test_resnet"], tmp_path)
    with pytest.raises(CnmcError, match="no evaluated test_resnet"):
        build_ensemble(tiny_params(), list(BACKBONES), tmp_path)
