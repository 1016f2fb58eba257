"""The top-level files users rely on are present and valid."""

from __future__ import annotations

import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def test_data_dvc_tracks_the_folder_params_yaml_reads() -> None:
    tracked = yaml.safe_load((ROOT / "data.dvc").read_text())["outs"]
    assert [out["path"] for out in tracked] == [yaml.safe_load((ROOT / "params.yaml").read_text())["data_dir"]]


def test_every_mlproject_command_is_one_the_cli_takes_with_its_defaults() -> None:
    """An unset MLproject parameter is "", which every flag it feeds reads as "keep params.yaml".
    (`mlflow run` itself reads the file in tests/jobs/test_experiment.py.)"""
    import shlex

    from cnmc.cli import build_parser
    from cnmc.cli.common import params_from_args

    project = yaml.safe_load((ROOT / "MLproject").read_text())
    assert project["name"] == "cnmc" and {"main", "prepare"} <= set(project["entry_points"])
    for name, entry in project["entry_points"].items():
        defaults = {key: spec.get("default", "") for key, spec in entry["parameters"].items()}
        defaults["params"] = str(ROOT / "params.yaml")
        for command in entry["command"].format(**defaults).split("&&"):
            argv = shlex.split(command)
            assert argv[0] == "cnmc", name
            args = build_parser().parse_args(argv[1:])
            if hasattr(args, "set"):
                params_from_args(args)  # the overrides validate


def test_conda_env_lists_the_pyproject_dependencies() -> None:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    conda = yaml.safe_load((ROOT / "conda.yaml").read_text())
    pip = next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict))
    assert [d for d in pip if not d.startswith("-e")] == deps
    assert "python=3.11" in conda["dependencies"]


def test_dvc_yaml_stages_read_params_that_exist() -> None:
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert list(stages)[:3] == ["manifest", "split", "augment"]
    for stage in stages.values():
        for key in stage.get("params", []):
            node = params
            for part in key.split("."):
                assert part in node, f"dvc.yaml names param {key}, absent from params.yaml"
                node = node[part]


def test_ci_runs_make_test() -> None:
    assert "make test" in (ROOT / ".ci/run").read_text()
