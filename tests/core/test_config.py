"""params.yaml flows into typed config; profiles; one-line errors for bad settings."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from cnmc.cli import main
from cnmc.core.config import Params, load_params, profile_params, render_params
from cnmc.core.errors import CnmcError

ROOT = Path(__file__).resolve().parents[2]


def test_committed_params_is_the_demo_profile() -> None:
    assert (ROOT / "params.yaml").read_text() == render_params(profile_params("demo"), "demo")
    assert load_params(ROOT / "params.yaml") == profile_params("demo")  # the defaults and demo.yaml's few overrides


def test_paper_profile_has_the_papers_values(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["profile", "paper", "-o", str(tmp_path / "params.yaml")]) == 0
    # Offline (the tests' HF_HUB_OFFLINE) the hub backbones' needs are said now, not after the augment stage.
    said = capsys.readouterr().out
    for backbone in ("resnet50", "resnet101", "efficientnet_b0", "efficientnet_b1", "efficientnet_b3"):
        assert f"before `dvc repro`: no pretrained weights for {backbone}:" in said
    args = ["--splits-dir", str(tmp_path / "splits"), "--out-dir", str(tmp_path / "images")]
    assert main(["augment", "--params", str(tmp_path / "params.yaml"), *args]) == 2
    assert "5 backbone(s) of train.backbones lack weights" in capsys.readouterr().err
    paper = load_params(tmp_path / "params.yaml")
    assert paper.split.protocol == "paper"
    assert paper.split.test_fraction == 0.1
    assert (paper.augment.image_size, paper.augment.per_class, paper.augment.strength) == (224, 10000, 1.0)


def test_real_profile_carries_the_benchs_choices(tmp_path: Path) -> None:
    """`cnmc profile real` writes what the unseen-people bench chose (docs/benchmarks.md): cross-fitting
    over people, LP-FT with batch-norm statistics kept, 128 px whole frames, lite0 first."""
    assert main(["profile", "real", "-o", str(tmp_path / "params.yaml")]) == 0
    real = load_params(tmp_path / "params.yaml")
    assert real == profile_params("real") != profile_params("demo")
    assert (real.split.validation, real.split.folds) == ("crossfit", 3)
    assert (real.train.head_init, real.train.freeze_bn) == ("linear_probe", True)
    assert (real.augment.image_size, real.augment.crop, real.train.epochs) == (128, "frame", 4)
    assert real.train.backbones[0] == "tf_efficientnet_lite0"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("augment:\n  image_sise: 3\n", "augment.image_sise: Extra inputs are not permitted"),
        ("split:\n  protocol: random\n", "split.protocol"),
        ("augment:\n  strength: 2\n", "augment.strength: Input should be less than or equal to 1"),
        ("augment: [1\n", "not valid YAML"),
        ("- 1\n", "expected a mapping"),
        ("tune:\n  storage: optuna.db\n", "tune.storage: .*expected journal:PATH .* or an RDB URL"),
        ("tune:\n  storage: 'journal:'\n", "tune.storage: .*got 'journal:'"),
        # settings that pass a bound check but would fail a run minutes later
        ("train:\n  lr: .inf\n", "train.lr: Input should be a finite number"),
        ("tune:\n  lr_max: .nan\n", "tune.lr_max: Input should be a finite number"),
        ("seed: -1\n", "seed: Input should be greater than or equal to 0"),
        ("seed: 4294967296\n", "seed: Input should be less than 4294967296"),
        # YAML keeps the last of a key given twice: an edit that silently does nothing
        ("train:\n  lr: 0.1\nsplit: {}\ntrain:\n  epochs: 2\n", "line 4: the key 'train' is given twice"),
        ("train:\n  lr: 0.1\n  lr: 0.2\n", "line 3: the key 'lr' is given twice"),
    ],
)
def test_bad_params_give_one_line_errors(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(CnmcError, match=message) as info:
        load_params(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_yaml_merge_keys_work_and_a_written_out_key_overrides_the_merged_one(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  <<: &common {lr: 0.001, epochs: 2}\n  epochs: 3\n")
    params = load_params(path)
    assert (params.train.lr, params.train.epochs) == (0.001, 3)
    path.write_text("train:\n  <<: &common {lr: 0.001, epochs: 2}\n  epochs: 3\n  epochs: 4\n")
    with pytest.raises(CnmcError, match="line 4: the key 'epochs' is given twice"):  # still refused
        load_params(path)


def test_a_params_file_that_is_not_utf8_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_bytes("seed: 1\ndata_dir: donn\u00e9es\n".encode("latin-1"))
    with pytest.raises(CnmcError, match=r"not UTF-8 text \(byte 22\)") as info:
        load_params(path)
    assert str(info.value).startswith(str(path))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["serve", "--port", "70000"], "argument --port: a port is 1 to 65535, got 70000"),
        (["serve", "--port", "http"], "argument --port: expected a port number, got 'http'"),
        (["serve", "--max-body-mb", "inf"], "argument --max-body-mb: must be a finite number above 0, got inf"),
        (["predict", "--batch-size", "0", "x.png"], "argument --batch-size: must be a finite number above 0, got 0"),
    ],
)
def test_flags_out_of_range_are_refused_before_anything_runs(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("storage", "journal"),
    [
        (Params().tune.storage, Path("optuna-journal.log")),  # the default: a journal file
        ("journal:/shared/disk/optuna.log", Path("/shared/disk/optuna.log")),
        ("sqlite:///optuna.db", None),
        ("postgresql+psycopg2://user:secret@db-host:5432/optuna", None),
    ],
)
def test_tune_storage_is_a_journal_file_or_an_rdb_url(storage: str, journal: Path | None) -> None:
    from cnmc.core.config import journal_path

    assert journal_path(Params.model_validate({"tune": {"storage": storage}}).tune.storage) == journal


def test_cli_reports_user_errors_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.yaml"
    assert main(["split", "--params", str(missing)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"cnmc split: error: {missing}: params file not found (run `cnmc profile demo` to write one)"


def test_cli_flags_override_params(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["augment", "--params", str(ROOT / "params.yaml"), "--strength", "3"]) == 2
    assert "augment.strength" in capsys.readouterr().err


def test_params_from_layers_a_partial_file(tmp_path: Path) -> None:
    from cnmc.core.config import merge_params_file

    tuned = tmp_path / "tuned.yaml"
    tuned.write_text("# from cnmc tune\ntrain:\n  lr: 0.0003\naugment:\n  strength: 0.4\n")
    merged = merge_params_file(Params(), tuned)
    assert (merged.train.lr, merged.augment.strength, merged.train.epochs) == (3e-4, 0.4, Params().train.epochs)
    tuned.write_text("train:\n  lr: -1\n")
    with pytest.raises(CnmcError, match="train.lr"):
        merge_params_file(Params(), tuned)


def test_the_champion_uri_is_built_from_promote_and_read_by_the_cli(tmp_path) -> None:
    from cnmc.cli import build_parser
    from cnmc.cli.common import model_uri
    from cnmc.core.config import PromoteConfig

    def uri(*argv: str) -> str:
        return model_uri(build_parser().parse_args(["predict", "cell.bmp", *argv]))

    assert PromoteConfig().model_uri == "models:/cnmc-classifier@champion"
    params = tmp_path / "params.yaml"
    params.write_text("promote:\n  model_name: mine\n  alias: best\n")
    assert uri("--params", str(params)) == "models:/mine@best"
    assert uri("--params", str(params), "--set", "promote.alias=other") == "models:/mine@other"
    assert uri("--model", "runs:/x/model", "--params", str(params)) == "runs:/x/model"
    assert uri("--params", str(tmp_path / "absent.yaml")).endswith("@champion")


def test_set_overrides_any_setting_once_validated_and_in_order(tmp_path) -> None:
    from cnmc.cli import build_parser
    from cnmc.cli.common import params_from_args
    from cnmc.core.errors import CnmcError

    params = tmp_path / "params.yaml"
    params.write_text("train:\n  lr: 0.01\n")

    def parsed(*argv: str):  # noqa: ANN202
        return params_from_args(build_parser().parse_args(["train", "--backbone", "b", "--params", str(params), *argv]))

    got = parsed(
        "--set",
        "train.lr=3e-4",
        "--set",
        "train.backbones=[a, b]",
        "--epochs",
        "2",
        "--set",
        "augment.per_class=auto",
        "--set",
        "train.head_init=linear_probe",
    )
    assert got.train.lr == 3e-4 and got.train.backbones == ["a", "b"] and got.train.epochs == 2
    assert got.train.head_init == "linear_probe" and got.augment.per_class == "auto"
    assert parsed("--set", "train.lr=").train.lr == 0.01  # empty: the file's value (MLproject's unset)
    assert parsed("--epochs", "3", "--set", "train.epochs=4").train.epochs == 4  # --set comes last
    for bad, message in (
        ("train.lr=-1", "train.lr: Input should be greater than 0"),
        ("train.bogus=1", "no setting 'train.bogus'"),
        ("nope=1", "no setting 'nope'"),
        ("train.lr", "expected KEY=VALUE"),
        ("train=1", "no setting 'train'"),
    ):
        with pytest.raises(CnmcError, match=re.escape(message)):
            parsed("--set", bad)
