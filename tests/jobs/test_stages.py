"""The DVC stage files are rendered from cnmc.jobs.stages, and what each stage declares follows from the
typed config and the code the stage runs: a setting or a source file a stage uses is never missing."""

from __future__ import annotations

from pathlib import Path

import yaml

from cnmc.core.config import Params
from cnmc.jobs.stages import FILES, PIPELINE, render, settings_read

ROOT = Path(__file__).resolve().parents[2]


def stage(name: str):  # noqa: ANN201
    return next(s for s in PIPELINE if s.name == name)


def test_the_stage_files_are_the_rendering_of_cnmc_stages() -> None:
    for name, (stages, about) in FILES.items():
        assert (ROOT / name).read_text() == render(stages, about), (
            f"{name} is out of date: run `python -m cnmc.jobs.stages` and commit the result"
        )


def test_every_setting_the_fit_reads_retrains_and_nothing_else_does() -> None:
    params = set(stage("train").params())
    assert {"train.head_init", "train.freeze_bn", "split.min_images_per_class", "seed"} <= params
    fields = Params.model_fields["train"].annotation.model_fields
    runtime = {f"train.{k}" for k, f in fields.items() if (f.json_schema_extra or {}).get("runtime_only")}
    assert {"train.device", "train.num_workers", "train.compile"} <= runtime
    runtime.add("train.backbones")  # the matrix itself
    evaluate_only = {"train.test_time_augmentation"}  # how the trained model answers: evaluate's
    assert evaluate_only <= set(stage("evaluate").params())
    every_train_setting = {f"train.{k}" for k in fields} - runtime - evaluate_only
    assert every_train_setting <= params, every_train_setting - params
    # Online augmentation draws T in training: its switch, strength and draws a class (M) are the
    # fit's (the image size comes in by name with the store's, which the stage depends on anyway).
    online = {"augment.online", "augment.strength", "augment.per_class", "augment.auto_min", "augment.image_size"}
    assert {"augment.online", "augment.strength", "augment.per_class"} <= params
    assert not params & runtime and not any(p.startswith(("promote.", "tune.", "augment.")) for p in params - online)


def test_a_module_attribute_named_like_a_setting_is_not_that_setting() -> None:
    """``torch.channels_last`` in the inference code does not make ``train.channels_last`` evaluate's."""
    assert "train.channels_last" in stage("train").params()
    assert "train.channels_last" not in stage("evaluate").params()


def test_serving_code_is_a_dep_of_evaluate_and_not_of_train() -> None:
    train, evaluate = set(stage("train").code_deps()), set(stage("evaluate").code_deps())
    judged = {
        f"src/cnmc/{name}.py"
        for name in ("serving/pyfunc", "inference/tta", "plots/gradcam", "metrics/calibration", "serving/model_env")
    }
    assert not train & judged, train & judged
    assert (
        judged <= evaluate
        and "src/cnmc/jobs/train.py" not in evaluate
        and "src/cnmc/training/trainer.py" not in evaluate
    )
    assert {"src/cnmc/training/trainer.py", "src/cnmc/jobs/train.py", "src/cnmc/models/backbones.py"} <= train


def test_the_derivation_follows_the_code(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    """A setting counts once the code names its section (or config class) and the field."""
    import cnmc.jobs.stages as stages

    code = tmp_path / "probe.py"
    code.write_text("def f(cfg: SplitConfig, seed: int):\n    return cfg.val_fraction, cfg.epochs\n")
    monkeypatch.setattr(stages, "code_closure", lambda entry: ([code], set()))
    assert settings_read("probe") == {"seed", "split.val_fraction"}


def test_only_fields_of_config_objects_count(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    """``args.lr`` or ``model.patience`` are no settings; a config object is followed through
    assignments, ``self`` and ``model_copy``."""
    import cnmc.jobs.stages as stages

    code = tmp_path / "probe.py"
    code.write_text(
        "class Job:\n"
        "    def __init__(self, params: Params, args, model):\n"
        "        self.params = params\n"
        "        cfg, tune = params.train.model_copy(), self.params.tune\n"
        "        print(args.lr, model.patience, cfg.epochs, tune.n_trials, self.params.seed)\n"
    )
    monkeypatch.setattr(stages, "code_closure", lambda entry: ([code], set()))
    assert settings_read("probe") == {"seed", "train.epochs", "tune.n_trials"}


def test_promote_and_report_read_their_settings_through_their_own_modules() -> None:
    assert {"split.protocol", "promote.metric", "promote.rank_on"} <= set(stage("promote").params())
    assert stage("report").params() == ["train.backbones"]
    rendered = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert rendered["train"]["cmd"].endswith("--no-evaluate")
    assert rendered["evaluate"]["deps"][:2] == ["outputs/images", "outputs/models/${item.backbone}"]
