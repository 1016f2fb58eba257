"""The DVC pipeline, defined once: ``dvc.yaml`` and ``tuning/dvc.yaml`` are rendered from here
(``python -m cnmc.jobs.stages``), and a test fails when the files on disk differ from the rendering.

Each stage names its entry module and its data; what it must declare follows by construction:

* **deps**: the stage's data plus every project source file the entry module imports, followed
  to the end (:func:`cnmc.core.imports.code_closure`). A file a stage never runs is never its dep, so
  a serving docstring retrains nothing.
* **params**: every setting of the typed config (:class:`cnmc.core.config.Params`) that the stage's
  code reads, found by reading the code: a section's field counts when the code names the section
  (``params.train``, or its class ``TrainConfig``) and the field (``cfg.head_init``); a top-level
  setting counts when the code names it (``params.seed``, an argument ``seed``). Settings marked
  ``runtime_only`` in the config (workers, device) and the stage's own matrix list are left out;
  ``${...}`` in the command is added.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from cnmc.core.config import Params
from cnmc.core.imports import PACKAGE_DIR, code_closure, parsed

PROJECT_DIR = PACKAGE_DIR.parents[1]  # src/cnmc -> the repository
CONFIG_FILE = PACKAGE_DIR / "core" / "config.py"  # defines the settings; reading one happens elsewhere
MATRIX_KEY = "train.backbones"


@dataclass(frozen=True)
class Out:
    """An output path; ``cache=False`` keeps it in git's working tree (small reports, plots)."""

    path: str
    cache: bool = True
    options: dict[str, Any] = field(default_factory=dict)

    def render(self) -> str | dict[str, Any]:
        extra = ({} if self.cache else {"cache": False}) | self.options
        return {self.path: extra} if extra else self.path


@dataclass(frozen=True)
class Stage:
    name: str
    cmd: str
    entry: str  # the module the command runs
    data: tuple[str, ...] = ()  # data deps (other stages' outputs, the raw data)
    outs: tuple[Out, ...] = ()
    metrics: tuple[Out, ...] = ()
    plots: tuple[Out, ...] = ()
    matrix: bool = False  # one stage per backbone of train.backbones
    wdir: str = ""
    frozen: bool = False  # never run nor reported by `dvc repro` / `dvc status` until unfrozen

    def code_deps(self) -> list[str]:
        files, _ = code_closure(self.entry)
        return [path.relative_to(PROJECT_DIR).as_posix() for path in files]

    def params(self) -> list[str]:
        used = settings_read(self.entry)
        interpolated = set(re.findall(r"\$\{(?!item\.)([\w.]+)\}", self.cmd))
        return sorted((used - ({MATRIX_KEY} if self.matrix else set())) | interpolated, key=_param_order)

    def render(self) -> dict[str, Any]:
        body: dict[str, Any] = {}
        if self.matrix:
            body["matrix"] = {"backbone": "${" + MATRIX_KEY + "}"}
        if self.wdir:
            body["wdir"] = self.wdir
        if self.frozen:
            body["frozen"] = True
        body["cmd"] = self.cmd
        body["deps"] = list(self.data) + self.code_deps()
        body["params"] = self.params()
        for name in ("outs", "metrics", "plots"):
            if entries := getattr(self, name):
                body[name] = [out.render() for out in entries]
        return body


def settings_read(entry: str) -> set[str]:
    """``section.key`` (or top-level ``key``) of every setting the closure of ``entry`` reads."""
    files, _ = code_closure(entry)
    attributes: set[str] = set()  # cfg.head_init
    names: set[str] = set()  # TrainConfig, seed (an argument)
    for path in files:
        if path == CONFIG_FILE:
            continue
        tree = parsed(path)
        modules = _module_names(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute):
                if isinstance(node.value, ast.Name) and node.value.id in modules:
                    continue  # torch.channels_last is torch's, not the setting train.channels_last
                attributes.add(node.attr)
            elif isinstance(node, ast.Name | ast.arg):
                names.add(node.id if isinstance(node, ast.Name) else node.arg)
    read = set()
    for name, info in Params.model_fields.items():
        section = info.annotation
        if isinstance(section, type) and issubclass(section, BaseModel):
            if name in attributes or section.__name__ in names:
                read |= {
                    f"{name}.{key}"
                    for key, sub in section.model_fields.items()
                    if key in attributes and not _runtime_only(sub.json_schema_extra)
                }
        elif name in attributes or name in names:
            read.add(name)
    return read


def _module_names(tree: ast.Module) -> set[str]:
    """The names a file binds to imported modules (``torch``, ``np``): their attributes are no settings."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.asname or alias.name.split(".")[0] for alias in node.names}
    return names


def _runtime_only(extra: Any) -> bool:
    return isinstance(extra, dict) and bool(extra.get("runtime_only"))


def _param_order(key: str) -> tuple[int, int]:
    """Params in the order params.yaml holds them."""
    order = list(Params().model_dump())
    section, _, name = key.partition(".")
    fields = list(getattr(Params(), section).model_dump()) if name else []
    return order.index(section), fields.index(name) if name else -1


# How `dvc plots show` draws the data files (the PNGs are shown as they are).
ROC_PLOT = {"x": "fpr", "y": "tpr", "template": "simple", "title": "test ROC", "x_label": "FPR", "y_label": "TPR"}
CONFUSION_PLOT = {"x": "actual", "y": "predicted", "template": "confusion", "title": "test confusion matrix"}
EPOCH_PLOT = {"x": "epoch", "y": "val_f1_macro", "template": "linear", "title": "validation macro F1 by epoch"}

PIPELINE = (
    Stage(
        "manifest",
        "cnmc manifest ${data_dir} -o outputs/manifest.csv --report outputs/data_report.json",
        "cnmc.data.manifest",
        data=("${data_dir}",),
        outs=(Out("outputs/manifest.csv"), Out("outputs/data_report.json", cache=False)),
    ),
    Stage(
        "split",
        "cnmc split --manifest outputs/manifest.csv --out-dir outputs/splits --report outputs/split_report.json",
        "cnmc.data.split",
        data=("outputs/manifest.csv",),
        outs=(Out("outputs/splits"), Out("outputs/split_report.json", cache=False)),
    ),
    Stage(
        "augment",
        "cnmc augment --splits-dir outputs/splits --out-dir outputs/images --preview outputs/plots/augment_preview.png",
        "cnmc.data.augment",
        data=("outputs/splits",),
        outs=(Out("outputs/images"),),
        plots=(Out("outputs/plots/augment_preview.png", cache=False),),
    ),
    Stage(
        "train",
        "cnmc train --backbone ${item.backbone} --no-evaluate",
        "cnmc.jobs.train",
        data=("outputs/images",),
        matrix=True,
        outs=(Out("outputs/models/${item.backbone}"),),
        plots=(
            Out("outputs/curves/${item.backbone}/curves.png", cache=False),
            Out("outputs/curves/${item.backbone}/history.csv", cache=False, options=EPOCH_PLOT),
        ),
    ),
    Stage(
        "evaluate",
        "cnmc evaluate --backbone ${item.backbone}",
        "cnmc.jobs.evaluate",
        data=("outputs/images", "outputs/models/${item.backbone}"),
        matrix=True,
        outs=(Out("outputs/evaluation/${item.backbone}"), Out("outputs/metrics/${item.backbone}.json", cache=False)),
        metrics=(Out("outputs/headline/${item.backbone}.json", cache=False),),
        plots=(
            Out("outputs/plots/${item.backbone}/roc.csv", cache=False, options=ROC_PLOT),
            Out("outputs/plots/${item.backbone}/confusion.json", cache=False, options=CONFUSION_PLOT),
            *(
                Out(f"outputs/plots/${{item.backbone}}/{name}.png", cache=False)
                for name in ("roc", "confusion", "reliability", "gradcam")
            ),
        ),
    ),
    Stage(
        "report",
        "cnmc report --metrics-dir outputs/metrics --out-dir outputs/report",
        "cnmc.jobs.report",
        data=("outputs/metrics",),
        outs=(Out("outputs/report", cache=False),),
    ),
    Stage(
        "promote",
        "cnmc promote --from-pipeline --out-dir registry",
        "cnmc.tracking.model_registry",
        data=("outputs/metrics", "outputs/report"),
        outs=(Out("registry/promotion.json", cache=False), Out("registry/model_card.md", cache=False)),
    ),
)
TUNING = (
    Stage(  # frozen: an optional search that adds trials to a study, not an output of the data
        "tune",
        "cnmc tune --output outputs/tuned.yaml",
        "cnmc.jobs.tune",
        data=("outputs/images",),
        wdir="..",
        frozen=True,  # and no outs: a missing outs/tuned.yaml would still show in `dvc status`
    ),
)
FILES = {
    "dvc.yaml": (
        PIPELINE,
        "The pipeline: raw data (data/, tracked by data.dvc) -> manifest -> split -> augment\n"
        "-> train@<backbone> (fit) -> evaluate@<backbone> -> report -> promote.",
    ),
    "tuning/dvc.yaml": (
        TUNING,
        "Optional Optuna tuning, frozen so that `dvc repro` and `dvc status` leave it alone: it adds\n"
        "trials to a study rather than computing an output of the data. Run `cnmc tune`, or as a DVC\n"
        "stage: `dvc unfreeze tuning/dvc.yaml:tune && dvc repro tuning/dvc.yaml`.",
    ),
}
HEADER = (
    "# Generated by `python -m cnmc.jobs.stages` from src/cnmc/jobs/stages.py: edit that, not this file.\n"
    "# deps = each stage's data + the source files its code imports; params = the settings it reads.\n"
)


def render(stages: tuple[Stage, ...], about: str) -> str:
    body = yaml.safe_dump({"stages": {s.name: s.render() for s in stages}}, sort_keys=False, width=120)
    return HEADER + "".join(f"# {line}\n" for line in about.splitlines()) + body


def write_all(root: Path = PROJECT_DIR) -> list[Path]:
    written = []
    for name, (stages, about) in FILES.items():
        path = root / name
        path.write_text(render(stages, about))
        written.append(path)
    return written


if __name__ == "__main__":
    for written in write_all():
        print(f"wrote {written}")
