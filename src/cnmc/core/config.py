"""Typed configuration: ``params.yaml`` (and CLI flags) flow into these objects once.

The field defaults, with ``profiles/demo.yaml``'s few overrides, are the *demo* profile, which runs
on a laptop CPU in minutes. The *real* profile (``profiles/real.yaml``) holds what the unseen-people
benchmark chose for real data on a CPU; the *paper* profile (``profiles/paper.yaml``) overrides only
what the paper fixes. ``cnmc profile
NAME`` writes either one to ``params.yaml``, the file DVC tracks.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from cnmc.core.errors import CnmcError, validated
from cnmc.core.metric_catalogue import metric_names

PARAMS_FILE = "params.yaml"
# Marks a setting that changes how fast a stage runs, never what it produces: DVC does not rerun for it.
RUNTIME_ONLY: dict[str, Any] = {"runtime_only": True}
PROFILES = ("demo", "real", "paper")
SPLITS = ("train", "val", "test")  # the split protocol's parts, in this order everywhere
JOURNAL_PREFIX = "journal:"  # tune.storage = journal:PATH names an Optuna journal file
_RDB_URL = re.compile(r"[A-Za-z][A-Za-z0-9+._-]*://")  # SQLAlchemy's dialect[+driver]://...


Crop = Literal["frame", "cell"]  # what a model sees: the whole frame, or the cell's square box


@dataclass(frozen=True)
class Framing:
    """How a decoded image becomes a model's square input: the whole frame, or the cell's square box
    (``crop = "cell"``, ``margin`` of the box's side around it), resized to ``image_size``
    (:func:`cnmc.data.transforms.frame`). The augment stage stores every image this way and the
    served model (``ModelSpec.framing``) frames what it is sent the same way, so a cell is seen
    alike in training, evaluation, prediction, serving and Grad-CAM."""

    image_size: int
    crop: Crop = "frame"
    margin: float = 0.1


class _Section(BaseModel):
    """A params section: unknown keys are errors, so a typo never passes silently; a number is
    finite (``.inf`` or ``.nan`` would pass a bound check and fail a run minutes later)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class SplitConfig(_Section):
    """How the manifest is cut into train/val/test."""

    protocol: Literal["subject", "paper"] = Field(
        "subject", description="subject: subject-disjoint (default); paper: the paper's cell-level 90/10"
    )
    val_fraction: float = Field(
        0.2, gt=0, lt=1, description="validation share of each class's images (whole subjects under 'subject')"
    )
    test_fraction: float = Field(
        0.1, gt=0, lt=1, description="test share (paper; subject protocol without a preliminary set)"
    )
    min_images_per_class: int = Field(
        30, ge=1, description="images of each class a held-out split needs to judge (threshold, T, epoch)"
    )
    min_subjects_per_class: int = Field(
        3, ge=1, description="people of each class validation needs before a threshold or temperature is fitted"
    )
    validation: Literal["crossfit", "holdout"] = Field(
        "crossfit",
        description="crossfit: K subject-grouped folds, every training person judges once (fewer folds where a "
        "class has fewer people, holdout where it has one); holdout: whole subjects by val_fraction",
    )
    folds: int = Field(5, ge=2, le=20, description="K, the cross-fitting folds (split.validation crossfit)")


class AugmentConfig(_Section):
    """Resizing and the paper's class-balancing augmentation T."""

    image_size: int = Field(96, ge=16, description="side of the stored square images (paper: 224)")
    crop: Crop = Field(
        "frame", description="what every image is cut to before resizing: the whole frame (paper), or the cell's square"
    )
    crop_margin: float = Field(0.1, ge=0, le=1, description="with crop cell: margin around the cell, share of its side")
    per_class: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        "auto",
        description="M: training images per class after balancing, drawn afresh each epoch when online "
        "(auto: the largest class; paper: 10000)",
    )
    auto_min: int = Field(
        300, ge=0, description="with per_class auto: at least this many a class, so a small set is still augmented"
    )
    strength: float = Field(1.0, ge=0, le=1, description="scales every magnitude of T (1 = paper, 0 = identity)")
    online: bool = Field(
        True,
        description="T drawn afresh every epoch on the stored originals, none stored (paper: false, M stored images)",
    )
    workers: int = Field(0, ge=0, description="worker processes (0 = all cores)", json_schema_extra=RUNTIME_ONLY)
    preview_images: int = Field(6, ge=1, description="originals shown in the preview grid")


class TrainConfig(_Section):
    """Fine-tuning one backbone (``cnmc train``); ``backbones`` is the DVC training matrix."""

    backbones: list[str] = Field(
        ["tf_efficientnet_lite0", "tf_efficientnet_lite1"], min_length=1, description="backbones the DVC matrix trains"
    )
    pretrained: bool = Field(True, description="start from ImageNet weights (false: random init)")
    weights_dir: str = Field("", description="folder with <backbone>.pth/.safetensors weights ('' = hub cache)")
    epochs: int = Field(5, ge=1, description="maximum epochs (paper: 50)")
    patience: int = Field(4, ge=1, description="epochs without better val macro F1 (or equal F1, lower loss; paper 15)")
    lr: float = Field(1e-4, gt=0, description="Adam learning rate (paper: 1e-4)")
    head_init: Literal["random", "linear_probe"] = Field(
        "random", description="new head: random, or a logistic regression on frozen features (LP-FT; paper: random)"
    )
    freeze_bn: bool = Field(False, description="batch-norm layers keep their pretrained statistics (paper: false)")
    lr_stem_factor: float = Field(1.0, gt=0, description="stem learning rate = lr x this (paper: 1)")
    lr_head_factor: float = Field(1.0, gt=0, description="new head's learning rate = lr x this (paper: 1)")
    rotation: Literal["none", "d4", "any"] = Field(
        "none",
        description="random symmetry of every training cell: d4 = 90-degree turns and flips, any = plus any angle",
    )
    colour: Literal["rgb", "centred", "grey"] = Field(
        "rgb", description="model input: rgb; centred = each cell's mean colour removed; grey (paper: rgb)"
    )
    hed_jitter: float = Field(0.0, ge=0, le=0.5, description="HED stain jitter of training cells, sigma (0 = off)")
    sampling: Literal["shuffle", "class", "subject"] = Field(
        "shuffle",
        description="epoch draws: shuffle; class = classes weigh equally; subject = and each donor in a class",
    )
    test_time_augmentation: Literal["off", "auto"] = Field(
        "auto", description="auto: 8-view TTA is the reported and served default where validation shows it helps"
    )
    batch_size: int = Field(32, ge=1, description="images per step")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto = cuda when available", json_schema_extra=RUNTIME_ONLY
    )
    num_workers: int = Field(
        -1, ge=-1, description="data-loader workers (-1 = auto: 0 on CPU, 8 on CUDA)", json_schema_extra=RUNTIME_ONLY
    )
    mixed_precision: bool = Field(True, description="bf16/fp16 autocast on CUDA (ignored on CPU)")
    channels_last: bool = Field(True, description="channels-last memory format (faster on CUDA and CPU)")
    compile: bool = Field(
        False,
        description="torch.compile the model (falls back, with a warning, where it fails)",
        json_schema_extra=RUNTIME_ONLY,
    )


class PromoteConfig(_Section):
    """Which run becomes the registered ``champion`` (``cnmc promote``)."""

    model_name: str = Field("cnmc-classifier", description="registered model name")
    alias: str = Field("champion", description="the released model: what serve, predict and explain use")
    candidate_alias: str = Field("challenger", description="alias every promotion moves to the best run")
    pipeline_releases: bool = Field(
        True, description="the promote stage may move the released alias (never inside `dvc exp run`)"
    )
    rank_on: Literal["val", "test"] = Field(
        "val", description="split whose metrics rank the runs (val: test stays unseen by the choice)"
    )
    metric: str = Field("roc_auc", description="metric to maximise (roc_auc: fitted neither threshold nor T)")
    tie_breaker: str = Field("f1_macro", description="second metric for ties")

    @field_validator("metric", "tie_breaker")
    @classmethod
    def _a_registered_metric(cls, name: str) -> str:
        if name not in metric_names():
            raise ValueError(f"{name!r} is not a metric; choose one of {', '.join(metric_names())}")
        return name

    @property
    def model_uri(self) -> str:
        """The URI that serves, predicts and explains with the champion: ``models:/<name>@<alias>``."""
        return f"models:/{self.model_name}@{self.alias}"


class TuneConfig(_Section):
    """Optuna search over learning rate and augmentation strength (``cnmc tune``)."""

    backbone: str = Field("tf_efficientnet_lite0", description="backbone every trial trains")
    n_trials: int = Field(6, ge=1, description="trials per `cnmc tune` call (adds to the study)")
    epochs: int = Field(3, ge=1, description="epochs per trial")
    lr_min: float = Field(1e-5, gt=0, description="learning-rate search range, log-uniform")
    lr_max: float = Field(1e-3, gt=0, description="upper end of the learning-rate range")
    strength_min: float = Field(0.0, ge=0, le=1, description="augmentation-strength search range")
    strength_max: float = Field(1.0, ge=0, le=1, description="upper end of the strength range")
    pruner: Literal["median", "none"] = Field("median", description="prune trials worse than the median")
    storage: str = Field(
        "journal:optuna-journal.log",
        description="study storage: journal:PATH (workers on one machine or shared disk) or an RDB URL (many machines)",
    )
    study_name: str = Field("cnmc-tune", description="study to create or resume")
    heartbeat_s: int = Field(
        60,
        ge=1,
        description="RDB storage: a worker's heartbeat; its trial is marked failed after 2 missed",
        json_schema_extra=RUNTIME_ONLY,
    )

    @field_validator("storage")
    @classmethod
    def _journal_file_or_rdb_url(cls, value: str) -> str:
        """One field holds either form, so the prefix or scheme must say which; a bare path is
        refused rather than guessed (a SQLite file? a journal?)."""
        if value.startswith(JOURNAL_PREFIX):
            path = value.removeprefix(JOURNAL_PREFIX)
            if path.strip() and not path.startswith("//"):
                return value
        elif _RDB_URL.match(value):
            return value
        raise ValueError(
            f"expected journal:PATH (e.g. journal:optuna-journal.log) or an RDB URL "
            f"(e.g. postgresql://user@host/db, sqlite:///optuna.db), got {value!r}"
        )


class Params(_Section):
    """Everything ``params.yaml`` holds."""

    seed: int = Field(42, ge=0, lt=2**32, description="one seed for every random choice of the pipeline (0 to 2^32-1)")
    data_dir: str = Field("data", description="raw data folder (tracked by data.dvc)")
    split: SplitConfig = SplitConfig()
    augment: AugmentConfig = AugmentConfig()
    train: TrainConfig = TrainConfig()
    promote: PromoteConfig = PromoteConfig()
    tune: TuneConfig = TuneConfig()


def journal_path(storage: str) -> Path | None:
    """The journal file a ``tune.storage`` setting names, or None where it is an RDB URL."""
    return Path(storage.removeprefix(JOURNAL_PREFIX)) if storage.startswith(JOURNAL_PREFIX) else None


def load_params(path: Path | str = PARAMS_FILE) -> Params:
    """Read and validate a params file; errors name the file and the offending key."""
    path = Path(path)
    raw = _read_yaml(path, missing="params file not found (run `cnmc profile demo` to write one)")
    return parse_params(raw, source=str(path))


def _read_yaml(path: Path, missing: str) -> object:
    """The YAML content of ``path``; a missing, unreadable, non-UTF-8 or unparsable file, or one
    with a key twice in a mapping (YAML would keep the last silently), is a one-line error naming it."""
    if not path.is_file():
        raise CnmcError(f"{path}: {missing}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise CnmcError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise CnmcError(f"{path}: cannot read ({exc.strerror or exc.__class__.__name__})") from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader) or {}
    except yaml.MarkedYAMLError as exc:
        where = f" at line {exc.problem_mark.line + 1}" if exc.problem_mark else ""
        raise CnmcError(f"{path}: not valid YAML{where}: {exc.problem or exc.__class__.__name__}") from None
    except yaml.YAMLError as exc:
        raise CnmcError(f"{path}: not valid YAML ({exc.__class__.__name__})") from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping. Merge keys (``<<: *common``)
    still work: a key written out beside them overrides the merged one, as YAML says."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {key!r} is given twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def parse_params(raw: Any, source: str) -> Params:
    """Validate a mapping into :class:`Params`, turning pydantic errors into one line."""
    return validated(Params, raw, source, "expected a mapping of settings at the top level")


def merge_params_file(params: Params, path: Path) -> Params:
    """``params`` with the values of a partial params file (e.g. ``tuned.yaml``) layered over it."""
    overrides = _read_yaml(path, missing="file not found")
    if not isinstance(overrides, dict):
        raise CnmcError(f"{path}: expected a mapping of settings at the top level")
    return parse_params(_deep_merge(params.model_dump(), overrides), source=str(path))


def apply_overrides(params: Params, assignments: Sequence[str]) -> Params:
    """``params`` with ``KEY=VALUE`` assignments (``train.lr=3e-4``, ``train.backbones=[a, b]``)
    layered over it, in order. Values are YAML; an empty value keeps the current one (so that an
    unset ``mlflow run`` parameter changes nothing). Unknown keys and bad values are one-line errors."""
    raw = params.model_dump()
    for text in assignments:
        key, sep, value = text.partition("=")
        if not sep or not key.strip():
            raise CnmcError(f"--set {text!r}: expected KEY=VALUE, e.g. train.lr=3e-4")
        *sections, name = key.strip().split(".")
        node = raw
        for section in sections:
            if not isinstance(node.get(section), dict):
                raise CnmcError(f"--set {key}: no section {section!r} in params (see params.yaml)")
            node = node[section]
        if name not in node or isinstance(node[name], dict):
            raise CnmcError(f"--set {key}: no setting {key!r} in params (see params.yaml)")
        if value.strip():
            try:
                node[name] = yaml.safe_load(value)
            except yaml.YAMLError:
                raise CnmcError(f"--set {key}: {value!r} is not a valid YAML value") from None
    return parse_params(raw, source="--set") if assignments else params


def profile_params(name: str) -> Params:
    """The params of a named profile: the defaults, plus the profile's overrides."""
    if name not in PROFILES:
        raise CnmcError(f"unknown profile {name!r}; choose one of {', '.join(PROFILES)}")
    text = resources.files("cnmc.profiles").joinpath(f"{name}.yaml").read_text()
    overrides = yaml.safe_load(text) or {}
    merged = _deep_merge(Params().model_dump(), overrides)
    return parse_params(merged, source=f"profile {name}")


def render_params(params: Params, profile: str) -> str:
    """YAML text of ``params`` with each key's description as a comment."""
    lines = [
        f"# Pipeline settings: profile '{profile}'. DVC tracks this file.",
        "# Switch profiles with `cnmc profile demo`, `cnmc profile real` or `cnmc profile paper` (rewrites this file).",
    ]
    lines += _render_model(params, indent="")
    return "\n".join(lines) + "\n"


def _render_model(model: BaseModel, indent: str) -> list[str]:
    lines: list[str] = []
    for name, info in type(model).model_fields.items():
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            lines.append(f"{indent}{name}:")
            lines += _render_model(value, indent + "  ")
            continue
        dumped = yaml.safe_dump({name: value}, default_flow_style=True, width=1000).strip()
        dumped = dumped.removeprefix("{").removesuffix("}")
        comment = f"  # {info.description}" if info.description else ""
        lines.append(f"{indent}{dumped}{comment}")
    return lines


def _deep_merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out
