"""End to end: `dvc repro` of the data pipeline in a temporary git repository, and a DVC
remote push/pull round trip. Real DVC, real git, the real `cnmc` CLI on the shipped demo cells."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest
from mlflow import MlflowClient

from cnmc.core.config import Params, parse_params, render_params

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(os.environ.get("VIRTUAL_ENV", ROOT / ".venv")) / "bin"
pytestmark = pytest.mark.slow

# Tiny settings for every stage on the shipped demo cells: 32 px store, two tiny random-init backbones.
SMALL = {
    "split": {
        "validation": "holdout"
    },  # the cross-fitted pipeline runs in `make demo`; tests/training/test_crossfit.py
    "augment": {"image_size": 32, "per_class": 12, "workers": 2, "preview_images": 2, "online": False},
    "train": {"backbones": ["test_resnet", "test_efficientnet"], "pretrained": False, "epochs": 1, "batch_size": 16},
}


def run(cmd: list[str], cwd: Path) -> str:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)  # stages must log to <DVC_ROOT>/mlflow.db
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def small_params() -> str:
    raw = Params().model_dump()
    for section, values in SMALL.items():
        raw[section].update(values)
    return render_params(parse_params(raw, "test"), "test")


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A throw-away git + DVC repository holding the pipeline definition and the source."""
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copytree(ROOT / "src", repo / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copy(ROOT / "dvc.yaml", repo / "dvc.yaml")
    (repo / "params.yaml").write_text(small_params())
    run(["git", "init", "-q"], repo)
    run([str(BIN / "dvc"), "init", "-q"], repo)
    run([str(BIN / "cnmc"), "demo-data", "data"], repo)
    run([str(BIN / "dvc"), "add", "-q", "data"], repo)
    return repo


def tree_hash(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(path.relative_to(folder).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def test_dvc_repro_runs_the_pipeline_then_only_what_changed(project: Path) -> None:
    run([str(BIN / "dvc"), "repro"], project)
    train = pd.read_csv(project / "outputs/images/train/index.csv")
    assert train["label"].value_counts().to_dict() == {"all": 12, "hem": 12}
    assert (project / "outputs/plots/augment_preview.png").stat().st_size > 0
    assert (project / "outputs/split_report.json").is_file()
    for backbone in ("test_resnet", "test_efficientnet"):
        assert (project / f"outputs/models/{backbone}/weights.pt").is_file()
        assert (project / f"outputs/metrics/{backbone}.json").is_file()
    assert "test_efficientnet" in (project / "outputs/report/comparison.md").read_text()
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("cnmc-subject").experiment_id])
    assert sorted(r.data.tags["backbone"] for r in runs) == ["test_efficientnet", "test_resnet"]
    champion = json.loads((project / "registry/promotion.json").read_text())
    assert champion["version"] == "1" and champion["promoted"] is True
    assert client.get_model_version_by_alias("cnmc-classifier", "champion").run_id == champion["run_id"]
    assert {r.data.tags["cnmc.kind"] for r in runs} == {"pipeline"}
    headline = json.loads((project / "outputs/headline/test_resnet.json").read_text())
    assert set(headline) == {"test", "val", "threshold", "temperature", "best_epoch", "tta"}
    # `dvc plots show` renders offline: images, no script or style from a CDN.
    run([str(BIN / "dvc"), "plots", "show", "-o", "plots-page"], project)
    page = (project / "plots-page" / "index.html").read_text()
    assert "<img" in page and "http://" not in page and "https://" not in page
    second = run([str(BIN / "dvc"), "repro"], project)
    assert "didn't change, skipping" in second or "up to date" in second
    assert "Running stage" not in second
    assert run([str(BIN / "dvc"), "status"], project).strip().endswith("up to date.")

    # A DVC experiment is not a release: it moves the challenger, never the champion, and
    # `dvc exp show` lists its headline metrics (the files git tracks). Its changed augment setting
    # reruns augment and what depends on it, not manifest or split.
    run(["git", "add", "-A"], project)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "baseline"], project)
    released = client.get_model_version_by_alias("cnmc-classifier", "champion")
    out = run([str(BIN / "dvc"), "exp", "run", "-n", "more-m", "-S", "augment.per_class=14"], project)
    assert "Running stage 'augment'" in out and "Running stage 'train@test_resnet'" in out
    assert "Running stage 'split'" not in out and "Running stage 'manifest'" not in out
    assert client.get_model_version_by_alias("cnmc-classifier", "champion").version == released.version
    experiment = client.get_experiment_by_name("cnmc-subject").experiment_id
    trained = client.search_runs([experiment], "tags.`dvc.experiment` = 'more-m'")
    assert len(trained) == 2 and {r.data.tags["cnmc.kind"] for r in trained} == {"experiment"}
    assert {r.info.run_name.rsplit("-", 1)[0] for r in trained} == {"test_resnet-more-m", "test_efficientnet-more-m"}
    promotion = json.loads((project / "registry/promotion.json").read_text())
    assert promotion["released"] is False and promotion["champion_version"] == str(released.version)
    challenger = client.get_model_version_by_alias("cnmc-classifier", "challenger")
    assert str(challenger.version) == promotion["version"]  # the best run of all: the experiment's or not
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    shown = subprocess.run(
        [str(BIN / "dvc"), "exp", "show", "--json"], cwd=project, env=env, capture_output=True, text=True
    ).stdout
    json.loads(shown)
    assert "more-m" in shown and "outputs/headline/test_resnet.json" in shown and '"roc_auc"' in shown
    # The README's readable view: only what differs from the committed baseline, and a diff against it.
    table = run([str(BIN / "dvc"), "exp", "show", "--only-changed", "--md"], project)
    header = next(line for line in table.splitlines() if line.startswith("|"))
    assert "augment.per_class" in header and header.count("|") <= 40, header
    run([str(BIN / "dvc"), "metrics", "diff", "HEAD"], project)  # exits 0: HEAD holds the baseline's headlines


def test_dvc_push_pull_round_trip_with_a_local_remote(project: Path, tmp_path: Path) -> None:
    dvc = str(BIN / "dvc")
    run([dvc, "remote", "add", "-d", "local", str(tmp_path / "remote")], project)
    before = tree_hash(project / "data")
    run([dvc, "push", "data.dvc"], project)
    shutil.rmtree(project / "data")
    shutil.rmtree(project / ".dvc" / "cache")
    run([dvc, "pull", "data.dvc"], project)
    assert tree_hash(project / "data") == before


def test_committed_data_dvc_describes_the_shipped_demo_set(tmp_path: Path) -> None:
    """`make demo` copies exactly what data.dvc records, so DVC sees no change."""
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(ROOT / "params.yaml", repo / "params.yaml")
    run(["git", "init", "-q"], repo)
    run([str(BIN / "dvc"), "init", "-q"], repo)
    run([str(BIN / "cnmc"), "demo-data", "data"], repo)
    run([str(BIN / "dvc"), "add", "-q", "data"], repo)
    assert (repo / "data.dvc").read_text() == (ROOT / "data.dvc").read_text()
